"""The staged exact loop on CUDA in bf16 at published layer widths equals transformers' eager experts forward bit for
bit: every expert resident, and streamed through a cache smaller than one layer's experts (several waves). The widths
matter: cuBLAS picks its kernel by shape and alignment, and the tiny models of test_families_gpu.py have neither the
shapes nor the padding (DeepSeek's and Qwen1.5's intermediate of 1408 leaves a bf16 row 2816 bytes long, so every
other expert block is padded to stay 512-byte aligned)."""

import copy

import pytest
import torch

from moeoffload.hooks import discover

pytestmark = pytest.mark.gpu

# name -> (config overrides of one MoE layer at published widths, with fewer experts to keep the test small)
WIDTHS = {
    "olmoe": ("olmoe-1b-7b", {"num_experts": 16}),
    "deepseek": ("deepseek-v2-lite", {"n_routed_experts": 16, "first_k_dense_replace": 0}),
    "qwen3": ("qwen3-30b-a3b", {"num_experts": 16}),
}


@pytest.mark.parametrize("name", list(WIDTHS))
def test_staged_loop_is_eager_at_published_widths(name, monkeypatch):
    import moeoffload.paths.exact
    from moebench.zoo import build_synthetic

    monkeypatch.setattr(moeoffload.paths.exact, "STAGED_MIN_EXPERTS", 1)  # staged at every token count, 1 included
    zoo_name, overrides = WIDTHS[name]
    model, _ = build_synthetic(zoo_name, layers=1, dtype=torch.bfloat16, overrides={"vocab_size": 512, **overrides},
                               show_progress=False)
    model.set_experts_implementation("eager")
    hook = discover(model)
    eager = copy.deepcopy(hook.layers[0]).cuda()
    forward = type(eager).forward.__wrapped__
    hidden_size, k, experts = eager.gate_up_proj.shape[-1], hook.top_k, hook.num_experts
    for budget in ("all", 5 * hook.layout.nbytes):  # 5 slots: a batch of many tokens needs three or four waves
        with moeoffload.offload(model, "lru", budget, device="cuda", show_progress=False) as handle:
            layer = handle.layers[0]
            assert layer.host_path.stages is not None
            for tokens in (1, 2, 8, 37, 256):
                for weight_dtype in (torch.bfloat16, torch.float32):
                    g = torch.Generator().manual_seed(tokens)
                    x = torch.randn(tokens, hidden_size, generator=g).cuda().bfloat16()
                    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).cuda()
                    weights = torch.rand(tokens, k, generator=g).cuda().to(weight_dtype)
                    want = forward(eager, x, index, weights)
                    got = layer(x, index, weights)
                    assert torch.equal(got, want), (f"{name} at {budget}, {tokens} tokens, {weight_dtype}: max diff "
                                                    f"{(got.float() - want.float()).abs().max().item()}")
