"""hooks.verify: the hook finds the dtype a family's eager forward sums in, and refuses a forward the exact loop
cannot reproduce, before any weight moves. The families here are made up (Mixtral's experts with another
epilogue), as a family a new transformers release brings would be."""

import pytest
import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moeoffload
import moeoffload.paths.exact
from moeoffload.errors import UnsupportedModelError
from moeoffload.hooks import discover
from moeoffload.hooks.verify import probe_routing

from .models import tiny_mixtral


@use_experts_implementation
class Float32SumExperts(MixtralExperts):
    """Inkling2's epilogue: each expert's weighted rows summed in float32, cast once at the end."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states, dtype=torch.float32)
        for expert in top_k_index.unique().tolist():
            pos, tok = torch.where(top_k_index.T == expert)
            gate, up = nn.functional.linear(hidden_states[tok], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out.to(hidden_states.dtype)


@use_experts_implementation
class UnweightedExperts(MixtralExperts):
    """Sums the experts' rows without their gate weights: nothing the loop computes."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return MixtralExperts.forward.__wrapped__(self, hidden_states, top_k_index, torch.ones_like(top_k_weights))


class SharedExperts3D(nn.Module):
    """3-D tensors under the experts' names, outside the ExpertsInterface (Inkling's shared experts)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(2, inner, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(2, hidden, inner) * 0.1)

    def forward(self, x):
        return x + torch.einsum("ti,eoi->to", torch.einsum("th,eih->ti", x, self.up_proj), self.down_proj)


def with_experts(cls, dtype=torch.bfloat16):
    """tiny_mixtral with every experts module replaced by `cls` holding the same (scaled-up) weights, so that a
    token's two contributions round apart in bf16."""
    model = tiny_mixtral(seed=3)
    for layer in model.model.layers:
        old = layer.mlp.experts
        new = cls(model.config)
        new.load_state_dict({k: v * 4 for k, v in old.state_dict().items()})
        layer.mlp.experts = new
    model = model.to(dtype)
    model.set_experts_implementation("eager")
    return model


def greedy(model, ids):
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        return tokens, model(tokens).logits


def test_probe_routing_gives_each_token_distinct_experts():
    for experts, k in ((8, 2), (2, 2), (256, 8), (4, 1)):
        ids = probe_routing(experts, k, "cpu")
        assert ids.shape[1] == k and bool((ids < experts).all())
        assert all(len(set(row)) == k for row in ids.tolist())


def test_standard_epilogue_sums_in_the_hidden_dtype():
    assert discover(with_experts(MixtralExperts)).sum_dtype is None


@pytest.mark.parametrize("staged_from", [10**9, 1], ids=["loop", "staged"])
def test_float32_sum_is_found_and_served_bit_for_bit(staged_from, monkeypatch):
    monkeypatch.setattr(moeoffload.paths.exact, "STAGED_MIN_EXPERTS", staged_from)
    model = with_experts(Float32SumExperts)
    assert discover(model).sum_dtype == torch.float32
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(7))
    ref_tokens, ref_logits = greedy(model, ids)
    for budget in (2 * discover(model).layout.nbytes, "all"):
        with moeoffload.offload(model, "lru", budget, device="cpu"):
            tokens, logits = greedy(model, ids)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits), f"at {budget}"


def test_the_sum_dtype_matters_here():
    """The test above would pass vacuously if this model's sums rounded alike in bf16 and in float32."""
    model = with_experts(Float32SumExperts)
    with moeoffload.offload(model, "lru", "all", device="cpu") as handle:
        for layer in handle.layers:
            layer.sum_dtype = None
        hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        index = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
        weights = torch.rand(16, 2)
        got = handle.layers[0](hidden, index, weights)
    reference = with_experts(Float32SumExperts).model.layers[0].mlp.experts
    assert not torch.equal(got, type(reference).forward.__wrapped__(reference, hidden, index, weights))


def test_a_forward_the_loop_cannot_reproduce_is_refused_before_any_weight_moves():
    model = with_experts(UnweightedExperts)
    before = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    with pytest.raises(UnsupportedModelError, match=r"UnweightedExperts \(.*\): its eager experts forward computes "
                                                    r"what the exact loop does not.*cannot serve this family exactly"):
        moeoffload.offload(model, "lru", "all", device="cpu")
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)
    assert model.config._experts_implementation == "eager"


def test_3d_tensors_outside_the_experts_interface_stay_resident():
    model = with_experts(MixtralExperts, torch.float32)
    model.model.layers[0].shared = SharedExperts3D(64, 16)
    hook = discover(model)
    assert len(hook.layers) == 2 and all(isinstance(m, MixtralExperts) for m in hook.layers)
    with moeoffload.offload(model, "lru", "all", device="cpu"):
        assert model.model.layers[0].shared.up_proj.numel() == 2 * 16 * 64
