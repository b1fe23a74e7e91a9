"""Every exact policy gives the unoffloaded model's greedy tokens, at every budget from one expert per MoE
layer to all experts; logits agree within dtype tolerance; unload restores the model bit for bit.
These run on the CPU everywhere (reference and engine on one device); test_gpu.py covers CUDA."""

import pytest
import torch

import moeoffload
from moeoffload.policies import BUILTIN

from .models import moe_layers, tiny_mixtral, tiny_switch

EXACT = [p.name for p in BUILTIN if p.exact and not p.preload]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def budgets(model):
    layers = moe_layers(model)
    expert = moeoffload.offload.__globals__["hooks"].discover(model).layout.nbytes
    return [layers * expert, layers * expert + expert // 2, "50%", "all"]  # 1/layer, between, half, all


def reference(model, ids, new_tokens):
    ids = ids.to(model.device)  # on a GPU machine the engine puts the model on CUDA
    with torch.no_grad():
        kwargs = {"attention_mask": torch.ones_like(ids)}
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        logits = model(input_ids=ids, decoder_input_ids=tokens[:, :4]).logits if model.config.is_encoder_decoder \
            else model(ids).logits
    return tokens, logits


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_switch], ids=["mixtral", "switch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_exact_policy_matches_unoffloaded_model(build, dtype):
    model = build(seed=1, dtype=dtype)
    ids = torch.randint(2, 96, (3, 9), generator=torch.Generator().manual_seed(7))
    ref_tokens, ref_logits = reference(model, ids, 10)
    cases = [("resident", "all")] + [(p, b) for p in EXACT for b in budgets(model)]
    for policy, budget in cases:
        with moeoffload.offload(model, policy, budget, device="cpu") as handle:
            tokens, logits = reference(model, ids, 10)
            stats = handle.stats()
        assert torch.equal(tokens.cpu(), ref_tokens), f"{policy} at {budget}: greedy tokens differ"
        err = (logits.float().cpu() - ref_logits.float()).abs().max().item()
        assert err <= TOL[dtype], f"{policy} at {budget}: logits differ by {err}"
        assert stats.cache_bytes <= stats.budget_bytes
        assert stats.hits + stats.misses > 0
    after, _ = reference(model, ids, 10)
    assert torch.equal(after.cpu(), ref_tokens), "unload did not restore the model"


def test_resident_copies_nothing_and_on_demand_copies_every_use():
    model = tiny_mixtral(seed=2)
    ids = torch.randint(2, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with moeoffload.offload(model, "resident", "all", device="cpu") as h:
        reference(model, ids, 4)
        s = h.stats()
        assert s.h2d_bytes == 0 and s.misses == 0 and s.hit_rate == 1.0
    with moeoffload.offload(model, "on-demand", "50%", device="cpu") as h:
        reference(model, ids, 4)
        s = h.stats()
        assert s.hits == 0 and s.h2d_copies == s.misses and s.h2d_bytes == s.misses * s.expert_bytes


def test_larger_cache_never_copies_more_on_the_same_workload():
    model = tiny_switch(seed=3)
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    copied = []
    for budget in ["25%", "50%", "75%", "all"]:
        with moeoffload.offload(model, "lru", budget, device="cpu") as h:
            reference(model, ids, 6)
            copied.append(h.stats().h2d_bytes)
    assert copied == sorted(copied, reverse=True), copied


def test_store_holds_the_only_copy_of_the_experts():
    model = tiny_mixtral(seed=4)
    before = sum(p.numel() for p in model.parameters())
    with moeoffload.offload(model, "lru", "50%", device="cpu") as h:
        left = sum(p.numel() for p in model.parameters())
        assert before - left == h.store.total_bytes // 4  # fp32: the experts left the model
    assert sum(p.numel() for p in model.parameters()) == before


def test_unload_frees_the_cache_and_the_store_and_keeps_stats():
    model = tiny_mixtral(seed=6)
    ids = torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(9))
    handle = moeoffload.offload(model, "lru", "50%", device="cpu")
    reference(model, ids, 3)
    during = handle.stats()
    handle.unload()
    after = handle.stats()
    assert handle.cache.pool.numel() == 0 and len(handle.store) == 0
    assert after == during  # what was measured survives the unload
