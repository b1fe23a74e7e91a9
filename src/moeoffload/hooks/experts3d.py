"""transformers 5 MoE families (Mixtral, Qwen-MoE, OLMoE, DeepSeek ...): experts as 3-D tensors.

These Experts modules dispatch their forward through `transformers.integrations.moe`'s ExpertsInterface by
`config._experts_implementation`; the hook registers the engine there as "moeoffload" and selects it, the
public seam transformers provides for exactly this. The expert matrices of expert e are
`gate_up_proj[e]` ([2I, H], gate and up concatenated) and `down_proj[e]` ([H, I]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..layer import OffloadedMoELayer
from ..layout import ExpertLayout
from .base import ModelHook, empty_parameter, next_in_stack, parents

IMPLEMENTATION = "moeoffload"


def _offloaded_forward(self, hidden_states, top_k_index, top_k_weights):
    layer = getattr(self, "_moeoffload_layer", None)
    if layer is None:
        raise RuntimeError(
            "this experts module selects the 'moeoffload' implementation but is not offloaded; "
            "call moeoffload.unload(model) or set_experts_implementation('eager')"
        )
    return layer(hidden_states, top_k_index, top_k_weights)


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, _offloaded_forward)


def _is_3d_experts(module: nn.Module) -> bool:
    up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def discover(model: nn.Module) -> ModelHook | None:
    layers = [m for m in model.modules() if _is_3d_experts(m)]
    if not layers:
        return None
    first = layers[0]
    unsupported = [
        flag
        for flag, bad in (("has_bias", True), ("is_transposed", True), ("has_gate", False), ("is_concatenated", False))
        if getattr(first, flag, not bad) == bad
    ]
    if unsupported:
        raise UnsupportedModelError(
            f"{type(first).__name__} stores experts with {', '.join(unsupported)}, which moeoffload does not "
            "handle yet; supported: concatenated gate/up, no bias, not transposed (Mixtral, Qwen-MoE, OLMoE, DeepSeek)"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_experts_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has 3-D experts but no transformers config to select an experts implementation"
        )
    _register()
    layout = ExpertLayout(
        names=("gate_up_proj", "down_proj"),
        shapes=(tuple(first.gate_up_proj.shape[1:]), tuple(first.down_proj.shape[1:])),
        dtype=first.gate_up_proj.dtype,
    )
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", 1)
    parent = parents(model)
    gates = [getattr(parent[id(m)], "gate", None) for m in layers]
    router_weight = None
    if all(isinstance(getattr(g, "weight", None), torch.Tensor) for g in gates):
        router_weight = lambda i: gates[i].weight  # noqa: E731
    return ModelHook(
        family="experts3d",
        layers=layers,
        num_experts=first.num_experts,
        top_k=int(top_k),
        layout=layout,
        expert_tensors=lambda m, e: {"gate_up_proj": m.gate_up_proj[e], "down_proj": m.down_proj[e]},
        expert_ffn=_expert_ffn,
        strip=_strip,
        install=_install,
        restore=_restore,
        router_weight=router_weight,
        next_layer=next_in_stack(model, layers),
        extra={"previous_implementation": _get_impl(model), "model": model},
    )


def _expert_ffn(module: nn.Module):
    apply_gate = module._apply_gate

    def ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(apply_gate(F.linear(x, w["gate_up_proj"])), w["down_proj"])

    return ffn


def _strip(module: nn.Module) -> None:
    module.gate_up_proj = empty_parameter(module.gate_up_proj)
    module.down_proj = empty_parameter(module.down_proj)


def _install(module: nn.Module, layer: OffloadedMoELayer) -> None:
    module._moeoffload_layer = layer


def _restore(module: nn.Module, tensors: list[dict[str, torch.Tensor]]) -> None:
    module.__dict__.pop("_moeoffload_layer", None)
    module.gate_up_proj = nn.Parameter(torch.stack([t["gate_up_proj"] for t in tensors]), requires_grad=False)
    module.down_proj = nn.Parameter(torch.stack([t["down_proj"] for t in tensors]), requires_grad=False)


def _get_impl(model: nn.Module):
    getter = getattr(model, "get_experts_implementation", None)
    return getter() if callable(getter) else model.config._experts_implementation


def select(model: nn.Module, implementation) -> None:
    """Select an experts implementation on the model and its sub-models (transformers' own setter when present)."""
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # older transformers 5.x
        chosen = implementation if isinstance(implementation, str) else implementation.get("")
        model.config._experts_implementation = chosen
