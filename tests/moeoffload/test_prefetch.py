"""Prefetch changes when experts move, never what is computed."""

import torch

import moeoffload
from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule

from .models import tiny_mixtral, tiny_switch
from .test_cache_properties import filled_store, tag_of


def test_prefetch_never_evicts_pinned_or_its_own_keys_and_counts_its_hits():
    store = filled_store(2, 4)
    cache = ExpertCache(store, 3, "cpu", make_rule("lru"))
    cache.acquire([(0, 0)])  # pinned: must survive
    assert cache.prefetch([(1, 0), (1, 1), (1, 2), (1, 3)]) == 2  # two free slots, nothing else evictable
    assert {(0, 0), (1, 0), (1, 1)} == cache.resident()
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)  # only the acquire counted: a prefetch is no request
    slot = cache.acquire([(1, 1)])[0]
    assert tag_of(cache, slot) == 1001
    assert cache.stats.prefetch_hits == 1 and cache.stats.hits == 1
    assert cache.transfer.stats.copies == 3


def test_prefetch_keeps_the_keys_of_its_call_that_were_already_resident():
    """A prefetch for the next layer whose experts are partly resident must not evict those to load the rest: the
    oracle had misses at a budget where it should have none (switch-base-32 `oracle@50%` on the H100)."""
    store = filled_store(2, 4)
    cache = ExpertCache(store, 2, "cpu", make_rule("lru"))
    for key in ((1, 0), (0, 0)):  # (1, 0) is the least recently used resident ...
        cache.acquire([key])
        cache.release([key])
    assert cache.prefetch([(1, 0), (1, 1)]) == 1  # ... and wanted by this prefetch: (0, 0) makes room instead
    assert cache.resident() == {(1, 0), (1, 1)}
    cache.acquire([(1, 0), (1, 1)])
    assert cache.stats.misses == 2  # the two acquires above; the prefetched layer hits entirely


def test_lookahead_policy_is_exact_and_prefetches():
    for build in (tiny_mixtral, tiny_switch):
        model = build(seed=5)
        ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            reference = model.generate(ids, **kwargs)
        for budget in ["25%", "50%"]:
            with moeoffload.offload(model, "lookahead", budget, device="cpu") as h:
                with torch.no_grad():
                    tokens = model.generate(ids, **kwargs)
                s = h.stats()
            assert torch.equal(tokens, reference), (build.__name__, budget)
            assert s.prefetches > 0 and s.cache_bytes <= s.budget_bytes
            assert s.h2d_copies == s.misses + s.prefetches


class _Broken:
    """Stands in for a predictor: raises, or names experts that do not exist."""

    def __init__(self, mode, cache, *args):
        self.mode, self.cache = mode, cache

    def __call__(self, layer_idx, hidden):
        if self.mode == "raises":
            raise RuntimeError("predictor crashed")
        self.cache.prefetch([(layer_idx, 10_000), (layer_idx + 99, 0)])


def test_broken_predictor_falls_back_to_on_demand_and_stays_exact(monkeypatch):
    import functools

    import pytest

    from moeoffload import predictors

    model = tiny_mixtral(seed=8)
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    for mode in ("raises", "out-of-range"):
        monkeypatch.setitem(predictors.PREFETCHERS, "lookahead", functools.partial(_Broken, mode))
        with moeoffload.offload(model, "lookahead", "50%", device="cpu") as h:
            with pytest.warns(RuntimeWarning, match="fetches experts on demand"):
                with torch.no_grad():
                    tokens = model.generate(ids, **kwargs)
            assert all(layer.prefetcher is None for layer in h.layers)
            assert h.stats().prefetches == 0
        assert torch.equal(tokens, reference), mode


def test_lookahead_stays_inside_a_stack():
    from moeoffload.hooks import discover

    switch = discover(tiny_switch())  # 4 + 4 layers, sparse step 2: MoE layers 0-1 encoder, 2-3 decoder
    assert switch.next_layer == [1, None, 3, None]
    assert discover(tiny_mixtral(layers=3)).next_layer == [1, 2, None]
