"""Switch Transformers: experts are a ModuleDict of dense FFNs (`wi`, `wo`) behind a top-1 router.

transformers offers no experts interface for this family, so the hook replaces the forward of each
`SwitchTransformersExperts` instance (not its class) and converts the router's one-hot dispatch mask
(tokens dropped by the capacity limit have an all-zero row) into canonical top-k ids, with the sentinel
`num_experts` for dropped tokens.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import OffloadedMoELayer
from ..layout import ExpertLayout
from ..staged import ExpertStages
from .base import (
    ModelHook,
    empty_parameter,
    function,
    integer,
    next_in_stack,
    optional_tensor,
    parents,
    submodule,
    tensor,
)
from .ffn import ExpertFFNSpec


def _is_switch_experts(module: nn.Module) -> bool:
    return type(module).__name__ == "SwitchTransformersExperts"


def discover(model: nn.Module) -> ModelHook | None:
    layers = [m for m in model.modules() if _is_switch_experts(m)]
    if not layers:
        return None
    first = _expert(layers[0], 0)
    if type(first).__name__ != "SwitchTransformersDenseActDense":
        return None
    wi, wo = _weight(first, "wi"), _weight(first, "wo")
    layout = ExpertLayout(names=("wi", "wo"), shapes=(tuple(wi.shape), tuple(wo.shape)), dtype=wi.dtype)
    parent = parents(model)
    routers = [submodule(submodule(parent[id(m)], "router"), "classifier") for m in layers]
    return ModelHook(
        family="switch",
        layers=layers,
        num_experts=integer(layers[0], "num_experts"),
        top_k=1,
        layout=layout,
        expert_tensors=lambda m, e: {"wi": _weight(_expert(m, e), "wi"), "wo": _weight(_expert(m, e), "wo")},
        expert_ffn=_expert_ffn,
        expert_stages=_expert_stages,
        strip=_strip,
        install=_install,
        restore=_restore,
        router_weight=lambda i: tensor(routers[i], "weight"),
        router_bias=lambda i: optional_tensor(routers[i], "bias"),
        next_layer=next_in_stack(model, layers),
        ffn=ExpertFFNSpec(kind="dense", act=_act_name(model, first), up="wi", down="wo", cast_before_down=True),
    )


def _expert(module: nn.Module, e: int) -> nn.Module:
    """Expert e of a `SwitchTransformersExperts` (a ModuleDict keyed `expert_{e}`)."""
    return submodule(module, f"expert_{e}")


def _weight(expert: nn.Module, projection: str) -> torch.Tensor:
    """The weight of an expert's projection (`wi` or `wo`, each an nn.Linear)."""
    return tensor(submodule(expert, projection), "weight")


def _act_name(model: nn.Module, expert: nn.Module) -> str:
    from transformers.activations import ACT2FN

    name = getattr(getattr(model, "config", None), "dense_act_fn", None)
    if isinstance(name, str) and name in ACT2FN and type(ACT2FN[name]) is type(expert.act):
        return name
    return type(expert.act).__name__


def _expert_ffn(module: nn.Module):
    act = function(_expert(module, 0), "act")

    def ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        h = act(F.linear(x, w["wi"]))
        if h.dtype != w["wo"].dtype:
            h = h.to(w["wo"].dtype)
        return F.linear(h, w["wo"])

    return ffn


def _expert_stages(module: nn.Module) -> ExpertStages:
    """`_expert_ffn` cut at its two projections: the activation and the cast between them work element by element."""
    act = function(_expert(module, 0), "act")
    wo_dtype = _weight(_expert(module, 0), "wo").dtype  # read before the store strips the weights

    def mid(h: torch.Tensor) -> torch.Tensor:
        h = act(h)
        return h if h.dtype == wo_dtype else h.to(wo_dtype)

    return ExpertStages(up="wi", down="wo", mid=mid)


def _strip(module: nn.Module) -> None:
    for expert in module.children():  # the experts, in ModuleDict order
        for projection in ("wi", "wo"):
            submodule(expert, projection).weight = empty_parameter(_weight(expert, projection))


def _install(module: nn.Module, layer: OffloadedMoELayer) -> None:
    num_experts = integer(module, "num_experts")

    def forward(self, hidden_states, selected_experts, routing_weights):
        # selected_experts: one-hot [T, 1, E]; routing_weights: [T, 1]
        mask = selected_experts.reshape(selected_experts.shape[0], -1)
        routed = mask.sum(dim=-1, keepdim=True) > 0
        top_k_index = torch.where(routed, mask.argmax(dim=-1, keepdim=True), num_experts)
        return layer(hidden_states, top_k_index, routing_weights.reshape(-1, 1))

    module.forward = types.MethodType(forward, module)
    module.__dict__["_moeoffload_layer"] = layer  # a plain attribute (not a submodule), popped by _restore


def _restore(module: nn.Module, tensors: list[dict[str, torch.Tensor]]) -> None:
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_moeoffload_layer", None)
    for e, weights in enumerate(tensors):
        expert = _expert(module, e)
        for projection in ("wi", "wo"):
            submodule(expert, projection).weight = nn.Parameter(weights[projection], requires_grad=False)
