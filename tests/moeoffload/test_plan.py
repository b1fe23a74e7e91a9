"""The execution plan: what "auto" picks, what an explicit choice refuses, and the exactness contract of every plan.

An exact policy served by a plan gives the tokens and logits of policy "resident" served by the same plan, bit for
bit, at every budget: on the grouped kernels every path computes an expert's rows with one kernel configuration,
in one row order (`moeoffload.paths`). On a CPU the grouped plans run the kernels' plain-torch form ("reference");
tests/moeoffload/test_gpu.py checks the Triton plans on CUDA.
"""

import pytest
import torch

import moeoffload
from moeoffload import policies
from moeoffload.hooks import discover
from moeoffload.plan import ExecutionPlan, make_plan
from moeoffload.store import ExpertStore

from . import models as M

EXACT_POLICIES = [p for p in moeoffload.available_policies()
                  if policies.get(p).exact and not policies.get(p).predictor and p != "resident"]
FAMILIES = {"mixtral": M.tiny_mixtral, "switch": M.tiny_switch, "olmoe": M.tiny_olmoe, "qwen3_moe": M.tiny_qwen3_moe}


def run(model, ids, new_tokens=5):
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        if model.config.is_encoder_decoder:
            logits = model(input_ids=ids, decoder_input_ids=tokens[:, :4]).logits
        else:
            logits = model(tokens).logits  # prefill: the host path at every budget
    return tokens, logits


def store_for(layers=2, experts=4):
    from moeoffload.layout import ExpertLayout

    return ExpertStore(ExpertLayout(("w",), ((4, 4),), torch.float32), layers, experts, pin_memory=False)


def plan(kernels="auto", fetch="auto", policy="lru", grouped_form=True, device="cpu", n_slots=4):
    return make_plan(kernels, fetch, policy=policies.get(policy), grouped_form=grouped_form,
                     device=torch.device(device), n_slots=n_slots, store=store_for())


def test_auto_on_a_cpu_is_the_exact_loop_fetched_on_the_host():
    got = plan()
    assert (got.kernels, got.fetch, got.eager_exact) == ("exact", "host", True)
    assert "no Triton on cpu" in got.why


def test_reference_kernels_fetch_on_the_device_where_the_policy_allows():
    assert plan("reference").fetch == "device"
    assert plan("reference", policy="lfu").fetch == "host"  # the directory keeps LRU and next-use only
    assert plan("reference", n_slots=8).fetch == "host"  # every expert resident: nothing to fetch
    assert plan("reference", "device", n_slots=8).fetch == "host"
    assert plan("reference").label == "reference+device-fetch"


@pytest.mark.parametrize("kernels, fetch, policy, grouped_form, match", [
    ("exact", "device", "lru", True, "kernels='triton' on CUDA or 'reference' on a CPU"),
    ("reference", "device", "lfu", True, "policy 'lfu' is not served by the device directory"),
    ("triton", "auto", "lru", True, "needs a CUDA device"),
    ("reference", "auto", "lru", False, "do not compute this model's expert form"),
    ("fast", "auto", "lru", True, "kernels='fast' is unknown"),
    ("auto", "gpu", "lru", True, "fetch='gpu' is unknown"),
])
def test_an_explicit_plan_that_cannot_be_served_is_refused_with_the_fix(kernels, fetch, policy, grouped_form, match):
    with pytest.raises(ValueError, match=match):
        plan(kernels, fetch, policy, grouped_form)


def test_a_form_the_grouped_kernels_cannot_compute_runs_the_exact_loop():
    got = plan(grouped_form=False)
    assert got.kernels == "exact" and "expert form" in got.why


def test_the_handle_the_stats_and_every_layer_read_one_plan():
    model = M.tiny_mixtral(seed=3)
    with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="reference") as handle:
        assert isinstance(handle.plan, ExecutionPlan)
        stats = handle.stats()
        assert (stats.kernels, stats.fetch) == (handle.plan.kernels, handle.plan.fetch) == ("reference", "device")
        assert all(layer.plan is handle.plan for layer in handle.layers)
        handle.switch("lfu", "50%", kernels="reference")
        assert handle.stats().fetch == "host" and all(layer.plan is handle.plan for layer in handle.layers)


def test_a_refused_switch_keeps_the_old_plan_serving():
    model = M.tiny_mixtral(seed=3)
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    with moeoffload.offload(model, "lru", "50%", device="cpu") as handle:
        with pytest.raises(ValueError, match="kernels='triton' needs a CUDA device"):
            handle.switch("lru", "25%", kernels="triton")
        assert handle.plan.kernels == "exact"
        run(model, ids, 2)


@pytest.mark.parametrize("family, dtype", [("mixtral", torch.bfloat16), ("switch", torch.float32),
                                           ("olmoe", torch.bfloat16), ("qwen3_moe", torch.float32)])
def test_exact_policies_on_the_grouped_kernels_give_the_resident_models_bits(family, dtype):
    model = FAMILIES[family](seed=5, dtype=dtype)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(11))
    with moeoffload.offload(model, "resident", "all", device="cpu", kernels="reference"):
        ref_tokens, ref_logits = run(model, ids)
    smallest = len(discover(model).layers) * discover(model).layout.nbytes  # one expert per MoE layer
    for policy in EXACT_POLICIES:
        for budget in (smallest, "50%"):
            for fetch in ("host", "auto"):
                with moeoffload.offload(model, policy, budget, device="cpu", kernels="reference", fetch=fetch) as h:
                    tokens, logits = run(model, ids)
                    label, misses = h.plan.label, h.stats().misses
                where = f"{family} {policy} at {budget} on {label}"
                assert misses > 0, where
                assert torch.equal(tokens, ref_tokens), f"{where}: greedy tokens differ from resident"
                assert torch.equal(logits, ref_logits), f"{where}: logits differ by {(logits - ref_logits).abs().max()}"


def test_a_store_filled_outside_the_model_serves_it():
    model = M.tiny_mixtral(seed=9)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    ref_tokens, _ = run(model, ids)
    hook = discover(model)
    store = ExpertStore(hook.layout, len(hook.layers), hook.num_experts, pin_memory=False)
    n = hook.layout.numel
    with torch.no_grad():
        for i, module in enumerate(hook.layers):
            slab = store.allocate_layer(i)
            for e in range(hook.num_experts):
                hook.layout.pack(hook.expert_tensors(module, e), slab[e * n : (e + 1) * n])
    with moeoffload.offload(model, "lru", "50%", device="cpu", store=store):
        tokens, _ = run(model, ids)
    assert torch.equal(tokens, ref_tokens)


def test_a_store_of_another_shape_is_refused():
    model = M.tiny_mixtral(seed=9)
    with pytest.raises(moeoffload.MoeOffloadError, match="build the store from this model's hook"):
        moeoffload.offload(model, "lru", "50%", device="cpu", store=store_for())
    hook = discover(model)
    empty = ExpertStore(hook.layout, len(hook.layers), hook.num_experts, pin_memory=False)
    with pytest.raises(moeoffload.MoeOffloadError, match="fill every expert"):
        moeoffload.offload(model, "lru", "50%", device="cpu", store=empty)


def test_a_switch_leaves_no_reference_to_the_old_pool():
    """The paths hold views of the pool and refer back to their layer; a switch must free the old pool at once,
    not when the cyclic collector runs (a larger pool next would find no room on the device)."""
    import gc
    import weakref

    model = M.tiny_mixtral(seed=3)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    gc.disable()
    try:
        with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="exact") as handle:
            run(model, ids, 2)
            storage = weakref.ref(handle.cache.pool.untyped_storage())
            handle.switch("lru", "25%", kernels="exact")
            assert storage() is None, "the old pool outlived its switch"
    finally:
        gc.enable()
