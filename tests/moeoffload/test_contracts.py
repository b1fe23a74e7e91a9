"""Plug-in parts that break their contract with the engine get one PolicyContractError naming the part, what it did
and what it must do, where the bad value enters; the cache is left as it was."""

import warnings
from types import SimpleNamespace

import pytest

from moeoffload import policies
from moeoffload.cache import ExpertCache
from moeoffload.errors import PolicyContractError, UnknownPolicyError
from moeoffload.eviction import EVICTION_RULES, LRU, make_rule
from tests.moeoffload.test_cache_properties import filled_store


class OutsideVictim(LRU):
    """Names an expert that is not among the candidates (not even in the model)."""

    def victim(self, candidates):
        return (999, 999)


class PinnedVictim(LRU):
    """Names the most recently used resident expert, pinned or not: unsafe when it is pinned."""

    def victim(self, candidates):
        return list(self)[-1]


class OldestVictim(LRU):
    """Names the least recently used resident expert, whatever it is offered."""

    def victim(self, candidates):
        return next(iter(self))


class RaisingVictim(LRU):
    def victim(self, candidates):
        raise KeyError("bookkeeping lost")


class UnhashableVictim(LRU):
    def victim(self, candidates):
        return [0, 0]


def full_cache(rule) -> ExpertCache:
    """Three slots holding (0, 0), (0, 1), (0, 2), none pinned."""
    cache = ExpertCache(filled_store(1, 5), 3, "cpu", rule)
    for expert in range(3):
        cache.release(cache.acquire([(0, expert)]) and [(0, expert)])
    return cache


def test_a_victim_outside_the_candidates_is_refused_by_name_and_the_cache_is_unchanged():
    cache = full_cache(OutsideVictim())
    before = cache.slot_of()
    with pytest.raises(PolicyContractError) as refused:
        cache.acquire([(0, 3)])
    assert str(refused.value) == ("eviction rule OutsideVictim.victim() returned (999, 999), which is not one of the "
                                  "3 candidates; victim() must return one of the keys it is given")
    assert cache.slot_of() == before
    assert not any(cache.is_pinned(k) for k in before)


def test_a_pinned_expert_named_as_victim_is_refused_never_evicted():
    cache = full_cache(PinnedVictim())
    cache.acquire([(0, 0)])  # pinned: the rule's most recently used, not a candidate
    with pytest.raises(PolicyContractError, match=r"returned \(0, 0\), which is not one of the 2 candidates"):
        cache.acquire([(0, 3)])
    assert cache.is_pinned((0, 0)) and cache.slot_of().keys() == {(0, 0), (0, 1), (0, 2)}


def test_a_victim_outside_the_demoted_experts_is_refused():
    cache = full_cache(OldestVictim())
    cache.demote([(0, 2)])  # the rule is then offered (0, 2) alone
    with pytest.raises(PolicyContractError, match=r"returned \(0, 0\), which is not one of the 1 candidates"):
        cache.acquire([(0, 3)])


@pytest.mark.parametrize(("rule", "said"), [
    (RaisingVictim(), r"RaisingVictim.victim\(\) raised KeyError: 'bookkeeping lost'; victim\(\) must return one"),
    (UnhashableVictim(), r"UnhashableVictim.victim\(\) returned \[0, 0\], which is not one of the 3 candidates"),
])
def test_a_victim_that_raises_or_is_not_a_key_is_refused(rule, said):
    cache = full_cache(rule)
    with pytest.raises(PolicyContractError, match=said):
        cache.acquire([(0, 3)])


def test_a_correct_rule_still_evicts_its_choice():
    cache = full_cache(make_rule("lru"))
    cache.acquire([(0, 3)])
    assert (0, 0) not in cache.resident()


def test_a_rule_factory_that_raises_or_builds_no_rule_is_named(monkeypatch):
    def crashing():
        raise RuntimeError("needs a config")

    monkeypatch.setitem(EVICTION_RULES, "crashing", crashing)
    monkeypatch.setitem(EVICTION_RULES, "half", lambda: SimpleNamespace(victim=min))
    with pytest.raises(PolicyContractError, match=r"eviction rule 'crashing': .*crashing\(\) raised RuntimeError: "
                                                  r"needs a config; EVICTION_RULES\['crashing'\] must build a rule"):
        make_rule("crashing")
    with pytest.raises(PolicyContractError, match=r"eviction rule 'half': .* returned a SimpleNamespace without "
                                                  r"on_insert\(\), on_access\(\), on_remove\(\); a rule has"):
        make_rule("half")


def test_an_error_names_its_policy_once_the_caller_knows_it():
    error = PolicyContractError("eviction rule X.victim() returned 1")
    assert str(error.for_policy("lru-bad")) == "policy 'lru-bad': eviction rule X.victim() returned 1"
    assert error.for_policy("a").for_policy("b").policy == "a"


class FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"fake_plugin:{name}", obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


@pytest.fixture
def plugin_registry(monkeypatch):
    """A fresh registry whose entry points are the ones a test hands to `install`."""
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))
    monkeypatch.setattr(policies, "_BROKEN", {})
    monkeypatch.setattr(policies, "_PLUGINS_LOADED", False)

    def install(*points):
        monkeypatch.setattr(policies, "entry_points", lambda group: list(points))
    return install


def test_entry_points_that_raise_or_give_no_policy_are_named_when_asked_for(plugin_registry):
    def crash():
        raise RuntimeError("plugin bug")

    good = policies.Policy("fine", "a working plugin policy")
    plugin_registry(FakeEntryPoint("crash", crash), FakeEntryPoint("number", lambda: 42),
                    FakeEntryPoint("missing", ImportError("No module named 'fake_plugin'")),
                    FakeEntryPoint("fine", lambda: good))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = policies.available()
    said = "\n".join(str(w.message) for w in caught)
    assert "policy entry point 'crash' (fake_plugin:crash) failed to load: its factory raised RuntimeError" in said
    assert "policy entry point 'number' (fake_plugin:number) failed to load: it gave a int, not a Policy" in said
    assert "policy entry point 'missing' (fake_plugin:missing) failed to load: ImportError" in said
    assert "fine" in names and "lru" in names and "crash" not in names
    with pytest.raises(PolicyContractError, match=r"entry point 'crash' \(fake_plugin:crash\) failed to load: its "
                                                  r"factory raised RuntimeError: plugin bug; .* fix or uninstall"):
        policies.get("crash")
    with pytest.raises(PolicyContractError, match=r"it gave a int, not a Policy; it must name a moeoffload.Policy"):
        policies.get("number")
    with pytest.raises(UnknownPolicyError):
        policies.get("never-installed")


def test_a_prefetcher_factory_that_raises_is_dropped_with_a_warning(monkeypatch):
    """A prefetch cannot change the output, so a prefetcher that cannot be built costs speed, not the offload."""
    import torch

    import moeoffload
    from moeoffload.predictors.registry import PREFETCHERS

    from .models import tiny_mixtral

    def broken(*args, **kwargs):
        raise RuntimeError("no router here")

    monkeypatch.setitem(PREFETCHERS, "lookahead", broken)
    model = tiny_mixtral(seed=2)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="policy 'lookahead': prefetcher 'lookahead' failed to build"):
        handle = moeoffload.offload(model, "lookahead", "50%", device="cpu")
    with handle, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        assert handle.stats().prefetches == 0 and handle.stats().misses > 0
