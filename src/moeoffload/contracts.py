"""Checks where a policy's plug-in parts hand values to the engine: an eviction rule that names a victim, a rule
factory that builds a rule. A third-party part that breaks its contract gets one `PolicyContractError` naming the
part, what it did and what it must do, raised where the bad value enters, instead of a KeyError deep in the
cache's bookkeeping. (A prefetcher that fails is dropped with a warning by its layer instead: a prefetch only
moves weights early, so the output cannot depend on it.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .errors import PolicyContractError

RULE_METHODS = ("on_insert", "on_access", "on_remove", "victim")  # moeoffload.eviction.EvictionRule


class Candidates(Protocol):
    """What an eviction rule is offered: membership and iteration, no length (the cache's lazy view has none)."""

    def __contains__(self, key: object, /) -> bool: ...

    def __iter__(self) -> Iterator[Any]: ...


def checked_victim(rule: Any, candidates: Candidates) -> Any:
    """`rule.victim(candidates)`, which must be one of `candidates`: the cache's view of its evictable experts
    (O(1) membership) or the short list of demoted ones. One membership test per eviction; the error path alone
    counts the candidates."""
    try:
        victim = rule.victim(candidates)
    except Exception as exc:
        raise PolicyContractError(f"eviction rule {type(rule).__name__}.victim() raised {type(exc).__name__}: {exc}; "
                                  "victim() must return one of the keys it is given (never an empty set)") from exc
    try:
        offered = victim in candidates
    except TypeError:  # unhashable: not a key
        offered = False
    if not offered:
        count = sum(1 for _ in candidates)
        raise PolicyContractError(f"eviction rule {type(rule).__name__}.victim() returned {victim!r}, which is not one "
                                  f"of the {count} candidates; victim() must return one of the keys it is given")
    return victim


def built_rule(name: str, factory: Callable[[], Any]) -> Any:
    """`factory()` (an entry of `eviction.EVICTION_RULES`), checked to be an eviction rule."""
    what = getattr(factory, "__qualname__", type(factory).__name__)
    try:
        rule = factory()
    except Exception as exc:
        raise PolicyContractError(f"eviction rule {name!r}: {what}() raised {type(exc).__name__}: {exc}; "
                                  f"EVICTION_RULES[{name!r}] must build a rule when called with no arguments") from exc
    missing = [m + "()" for m in RULE_METHODS if not callable(getattr(rule, m, None))]
    if missing:
        raise PolicyContractError(f"eviction rule {name!r}: {what}() returned a {type(rule).__name__} without "
                                  f"{', '.join(missing)}; a rule has {', '.join(m + '()' for m in RULE_METHODS)} "
                                  "(moeoffload.eviction.EvictionRule)")
    return rule
