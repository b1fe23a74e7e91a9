"""handle.switch(policy, budget): another policy over the same host store. Exact policies keep the unoffloaded
model's greedy tokens after any chain of switches, statistics start from zero, the store is filled once, a refused
or failed switch leaves a handle that still serves or still unloads, and unload restores the weights bit for bit."""

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeoffload
from moeoffload import predictors as P
from moeoffload.store import ExpertStore

from .models import tiny_mixtral, tiny_switch

ENGINE = importlib.import_module("moeoffload.offload")  # the module: `moeoffload.offload` is the function
BUILDS = {"mixtral": tiny_mixtral, "switch": tiny_switch}
NEW_TOKENS = 5


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{k} not restored bit for bit"
    assert not hasattr(model, "_moeoffload")


def _one_expert_per_layer(store: ExpertStore) -> int:
    return store.num_layers * store.expert_bytes


@pytest.mark.parametrize("name", list(BUILDS))
def test_switching_through_policies_keeps_tokens_resets_stats_and_fills_the_store_once(name, monkeypatch):
    model = BUILDS[name](seed=4)
    ids = _ids()
    reference = _greedy(model, ids)
    before = _weights(model)
    puts = []
    real_put = ExpertStore.put
    monkeypatch.setattr(ExpertStore, "put", lambda self, key, tensors: (puts.append(key), real_put(self, key,
                                                                                                    tensors))[1])

    handle = moeoffload.offload(model, "resident", "all", device="cpu")
    store, n_puts = handle.store, len(puts)
    assert n_puts == store.num_layers * store.num_experts
    buffers = {key: store.buffer(key).data_ptr() for key in store.keys()}
    assert torch.equal(_greedy(model, ids), reference)

    def record_oracle():
        handle.switch("lru", "50%")  # routing is recorded on an exact policy without a predictor
        return P.prepare("oracle", model, run=lambda: _greedy(model, ids), budget="50%", device="cpu")

    steps = [("lru", "50%", None), ("on-demand", _one_expert_per_layer(store), None), ("next-use", "25%", None),
             ("lookahead", "50%", None), ("oracle-belady", "25%", record_oracle), ("resident", "all", None),
             ("lru", "25%", None)]
    for policy, budget, prepare in steps:
        predictor = prepare() if prepare is not None else None
        assert moeoffload.switch(model, policy, budget, predictor=predictor) is handle
        fresh = handle.stats()
        assert (fresh.policy, fresh.hits, fresh.misses, fresh.h2d_bytes, fresh.prefetches) == (policy, 0, 0, 0, 0)
        n_slots, budget_bytes = ENGINE.plan_slots(moeoffload.get_policy(policy), budget, store, handle.device)
        assert (fresh.n_slots, fresh.budget_bytes) == (n_slots, budget_bytes)
        assert torch.equal(_greedy(model, ids), reference), f"{name}: {policy} at {budget} changed the tokens"
        s = handle.stats()
        assert s.hits + s.misses > 0 and s.cache_bytes <= s.budget_bytes
        if policy == "resident":
            assert s.misses == 0 and s.h2d_bytes == 0
    assert handle.store is store and len(puts) == n_puts, "a switch moved experts through the host again"
    assert {key: store.buffer(key).data_ptr() for key in store.keys()} == buffers
    handle.unload()
    _assert_restored(model, before)
    assert torch.equal(_greedy(model, ids), reference)


def test_a_refused_switch_keeps_the_old_policy_serving():
    model = tiny_mixtral(seed=6)
    ids = _ids()
    reference = _greedy(model, ids)
    with moeoffload.offload(model, "lru", "50%", device="cpu") as handle:
        _greedy(model, ids)
        hits = handle.stats().hits
        with pytest.raises(moeoffload.BudgetError, match="fewer than one per MoE layer"):
            handle.switch("lru", 1)
        with pytest.raises(moeoffload.BudgetError, match="gpu_budget='all'"):
            handle.switch("resident", "50%")
        with pytest.raises(moeoffload.MoeOffloadError, match="needs the recorded routing"):
            handle.switch("oracle", "50%")
        assert handle.stats().policy == "lru" and handle.stats().hits == hits  # nothing was torn down
        assert torch.equal(_greedy(model, ids), reference)


@pytest.mark.parametrize("where", ["pool", "preload"])
def test_a_switch_that_runs_out_of_memory_leaves_a_handle_that_switches_again_or_unloads(where, monkeypatch):
    model = tiny_switch(seed=7)
    ids = _ids()
    reference = _greedy(model, ids)
    before = _weights(model)
    handle = moeoffload.offload(model, "lru", "50%", device="cpu")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: no memory for the new cache")

    target = (ENGINE, "ExpertCache") if where == "pool" else (ENGINE.ExpertCache, "preload")
    with monkeypatch.context() as patch:
        patch.setattr(*target, out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            handle.switch("resident", "all")
    assert handle.active and not handle.serving and handle.layers == []
    with pytest.raises(moeoffload.MoeOffloadError, match=r"handle.switch\(policy, gpu_budget\) again"):
        handle.stats()
    with pytest.raises(moeoffload.MoeOffloadError, match="no expert cache"):
        _greedy(model, ids)
    assert "no expert cache" in repr(handle)
    handle.switch("lookahead", "25%")
    assert torch.equal(_greedy(model, ids), reference)
    with monkeypatch.context() as patch:
        patch.setattr(*target, out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            handle.switch("resident", "all")
    handle.unload()
    _assert_restored(model, before)
    assert torch.equal(_greedy(model, ids), reference)


def test_an_offload_that_runs_out_of_memory_puts_the_experts_back(monkeypatch):
    model = tiny_mixtral(seed=8)
    before = _weights(model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(ENGINE, "ExpertCache", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        moeoffload.offload(model, "lru", "50%", device="cpu")
    _assert_restored(model, before)


def test_switch_refuses_a_model_that_is_not_offloaded():
    model = tiny_mixtral(seed=9)
    with pytest.raises(moeoffload.NotOffloadedError, match=r"moeoffload.offload\(model"):
        moeoffload.switch(model, "lru", "50%")
    handle = moeoffload.offload(model, "lru", "50%", device="cpu")
    handle.unload()
    with pytest.raises(moeoffload.NotOffloadedError, match=r"offload it again"):
        handle.switch("lru", "25%")


def test_recording_routing_refuses_a_handle_whose_policy_has_a_predictor():
    model = tiny_mixtral(seed=10)
    ids = _ids()
    with moeoffload.offload(model, "lru", "50%", device="cpu") as handle:
        calls = P.prepare("oracle", model, run=lambda: _greedy(model, ids), budget="50%")
        handle.switch("oracle", "50%", predictor=calls)
        with pytest.raises(moeoffload.MoeOffloadError, match=r"handle.switch\('lru'"):
            P.prepare("oracle", model, run=lambda: _greedy(model, ids), budget="50%")


EXACT_PLAIN = ["lru", "lfu", "on-demand", "next-use", "lookahead", "lookahead-next-use"]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_mixtral(seed=11, layers=2, experts=4)
    ids = _ids(5)[:1]
    return model, ids, _greedy(model, ids), _weights(model)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(EXACT_PLAIN + ["resident"]),
                          st.sampled_from(["one-per-layer", "25%", "50%", "all"])), min_size=1, max_size=5))
def test_any_chain_of_switches_is_exact_and_unloads_bit_for_bit(tiny, chain):
    model, ids, reference, before = tiny
    with moeoffload.offload(model, "on-demand", "50%", device="cpu") as handle:
        for policy, budget in chain:
            budget = _one_expert_per_layer(handle.store) if budget == "one-per-layer" else budget
            if policy == "resident" and budget != "all":
                with pytest.raises(moeoffload.BudgetError):
                    handle.switch(policy, budget)
                continue
            handle.switch(policy, budget)
            assert handle.stats().hits == 0
            assert torch.equal(_greedy(model, ids), reference), (policy, budget)
    _assert_restored(model, before)
