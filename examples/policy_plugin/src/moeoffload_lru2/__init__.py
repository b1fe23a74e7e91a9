"""The `lru-2` policy: moeoffload's expert cache with an LRU-2 eviction rule, registered from outside.

moeoffload loads the entry point `lru-2 = moeoffload_lru2:make_policy` (group `moeoffload.policies`) the first
time its policy registry is read, calls `make_policy()` and registers the `Policy` it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count

from moeoffload import Policy
from moeoffload.eviction import EVICTION_RULES

ExpertKey = tuple[int, int]  # (MoE layer index, expert index), as moeoffload.store names an expert
NEVER = -1


class LRU2:
    """Evict the expert whose second most recent use is the oldest (LRU-K, K = 2).

    Each use (a hit, or a load: on demand or by a prefetch) is stamped with a counter. Experts used once have no
    second stamp and leave first, oldest first use first. Stamps outlive an eviction, so an expert that comes
    back is judged on its whole recent history, not as a newcomer. The cache only ever offers resident, unpinned
    experts as candidates, so this rule decides order, never safety.
    """

    name = "lru-2"

    def __init__(self) -> None:
        self._clock = count()
        self._last: dict[ExpertKey, int] = {}
        self._second_last: dict[ExpertKey, int] = {}

    def _touch(self, key: ExpertKey) -> None:
        if key in self._last:
            self._second_last[key] = self._last[key]
        self._last[key] = next(self._clock)

    def on_insert(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_access(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_remove(self, key: ExpertKey) -> None:
        pass  # history is kept: it is what tells a returning popular expert from a one-off

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        return min(candidates, key=lambda k: (self._second_last.get(k, NEVER), self._last.get(k, NEVER)))


def make_policy() -> Policy:
    """Entry point: register the eviction rule under its name, then return the policy that names it.

    The rule goes in first because `Policy` checks, when it is built, that its eviction rule exists.
    """
    EVICTION_RULES.setdefault(LRU2.name, LRU2)
    return Policy(
        name="lru-2",
        description="expert cache, LRU-2 eviction: the expert whose second-last use is oldest leaves first",
        eviction=LRU2.name,
        exact=True,  # only decides which expert leaves the GPU: outputs must equal the unoffloaded model's
        version="1",
    )
