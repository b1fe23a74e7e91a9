"""transformers 5 experts-interface families (Mixtral, Qwen-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS ...).

Their Experts modules hold every expert in 3-D tensors and dispatch their forward through
`transformers.integrations.moe`'s ExpertsInterface by `config._experts_implementation`; the hook registers the
engine there as "moeoffload" and selects it, the public seam transformers provides for exactly this. The flags that
`use_experts_implementation` sets on the module say how the tensors are stored:

- `has_gate`: `gate_up_proj` (gate and up together) or only `up_proj`;
- `is_transposed`: expert e's matrices are [in, out] and applied as `x @ W` (GPT-OSS) instead of [out, in];
- `has_bias`: `gate_up_proj_bias` / `down_proj_bias` beside the matrices (GPT-OSS), added after the product;
- `is_concatenated`: gate and up as two halves, or interleaved by column (GPT-OSS; its own `_apply_gate` splits).

Expert e's slices of these tensors become its buffer in the store, matrices first so that they stay aligned. Shared
experts (Qwen-MoE's `shared_expert`, DeepSeek's `shared_experts`) and dense layers are plain MLPs, not Experts
modules: they stay resident with the rest of the dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..layer import OffloadedMoELayer
from ..layout import ExpertLayout
from ..staged import ExpertStages
from .base import ModelHook, empty_parameter, function, integer, next_in_stack, parents, tensor
from .ffn import ExpertFFNSpec
from .verify import sum_dtype as eager_sum_dtype

IMPLEMENTATION = "moeoffload"
SUPPORTED = ("gate/up concatenated or interleaved, transposed or not, with or without biases, gated or not "
             "(Mixtral, Qwen-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS)")


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


def _is_3d(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3


def _is_3d_experts(module: nn.Module) -> bool:
    """3-D expert tensors behind the ExpertsInterface: a 3-D module whose forward does not dispatch there (Inkling's
    shared experts) cannot be routed to the engine, and stays resident as dense weights."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return _is_3d(up) and _is_3d(getattr(module, "down_proj", None)) and _dispatches(type(module))


def _dispatches(cls: type) -> bool:
    """`use_experts_implementation` wrapped the forward of this class or a base (functools.wraps marks it)."""
    return any(getattr(c.__dict__.get("forward"), "__wrapped__", None) is not None for c in cls.__mro__)


def _flags(module: nn.Module) -> dict[str, bool]:
    """The storage flags of `use_experts_implementation`, with the defaults of a module that predates them."""
    return {
        "has_gate": getattr(module, "has_gate", hasattr(module, "gate_up_proj")),
        "has_bias": getattr(module, "has_bias", False),
        "is_transposed": getattr(module, "is_transposed", False),
        "is_concatenated": getattr(module, "is_concatenated", True),
    }


def tensor_names(module: nn.Module) -> tuple[str, ...]:
    """Layout names of one expert, matrices first (they stay aligned in the flat buffer), then biases."""
    f = _flags(module)
    up = "gate_up_proj" if f["has_gate"] else "up_proj"
    names = (up, "down_proj")
    return names + ((f"{up}_bias", "down_proj_bias") if f["has_bias"] else ())


def _act_name(module: nn.Module) -> str | None:
    act = getattr(module, "act_fn", None)
    if act is None:
        return None
    from transformers.activations import ACT2FN

    name = getattr(getattr(module, "config", None), "hidden_act", None)
    if isinstance(name, str) and name in ACT2FN and type(ACT2FN[name]) is type(act):
        return name
    return type(act).__name__


def ffn_spec(module: nn.Module) -> ExpertFFNSpec:
    """What `module`'s experts compute, as data (see hooks.ffn)."""
    f = _flags(module)
    names = tensor_names(module)
    common: dict[str, Any] = dict(up=names[0], down=names[1], up_bias=names[2] if f["has_bias"] else None,
                                  down_bias=names[3] if f["has_bias"] else None, transposed=f["is_transposed"])
    if not f["has_gate"]:
        return ExpertFFNSpec(kind="dense", act=_act_name(module), **common)
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if gate is _default_apply_gate:
        return ExpertFFNSpec(kind="gated", act=_act_name(module), **common)
    if type(module).__name__ == "GptOssExperts":
        gpt_oss: Any = module  # its clamp's alpha and limit are plain floats, read by attribute
        return ExpertFFNSpec(kind="gpt-oss-clamped", act=None, interleaved=not f["is_concatenated"],
                             alpha=float(gpt_oss.alpha), limit=float(gpt_oss.limit), **common)
    return ExpertFFNSpec(kind="custom-gate", act=_act_name(module), interleaved=not f["is_concatenated"], **common)


def _check(model: nn.Module, layers: list[nn.Module]) -> None:
    first = layers[0]
    if getattr(first, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{type(first).__name__} normalises each expert's output (has_post_expert_norm), which moeoffload does "
            f"not handle yet; supported: {SUPPORTED}"
        )
    names = tensor_names(first)
    for m in layers:
        missing = [n for n in names if not isinstance(getattr(m, n, None), torch.Tensor)]
        if missing:
            raise UnsupportedModelError(
                f"{type(m).__name__} declares {_flags(m)} but has no tensor {', '.join(missing)}; "
                f"supported: {SUPPORTED}"
            )
        shapes = [tuple(getattr(m, n).shape) for n in names]
        if shapes != [tuple(getattr(first, n).shape) for n in names] or _flags(m) != _flags(first):
            raise UnsupportedModelError(
                f"{type(model).__name__} has experts modules of different shapes or storage ({type(first).__name__} "
                f"and {type(m).__name__}); moeoffload needs one expert layout per model"
            )
        dtypes = {getattr(m, n).dtype for n in names}
        if len(dtypes) != 1:
            raise UnsupportedModelError(
                f"{type(m).__name__} mixes dtypes {sorted(map(str, dtypes))} in one expert; cast the model to one "
                "dtype (model.to(torch.bfloat16)) before offloading"
            )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_experts_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has 3-D experts but no transformers config to select an experts implementation"
        )


def _routers(model: nn.Module, layers: list[nn.Module], num_experts: int) -> list[nn.Module] | None:
    """The router beside each experts module (`gate` in most families, `router` in GPT-OSS), or None."""
    parent = parents(model)
    found = []
    for m in layers:
        router = None
        for attr in ("gate", "router"):
            cand = getattr(parent[id(m)], attr, None)
            w = getattr(cand, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts:
                router = cand
                break
        if router is None:
            return None
        found.append(router)
    return found


def discover(model: nn.Module) -> ModelHook | None:
    layers = [m for m in model.modules() if _is_3d_experts(m)]
    if not layers:
        return None
    _check(model, layers)
    first = layers[0]
    _register()
    names = tensor_names(first)
    layout = ExpertLayout(
        names=names,
        shapes=tuple(tuple(getattr(first, n).shape[1:]) for n in names),
        dtype=getattr(first, names[0]).dtype,
    )
    config = _config(model)
    per_token: Any = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", 1)
    top_k = int(per_token)
    num_experts = integer(first, "num_experts")
    routers = _routers(model, layers, num_experts)
    router_weight: Callable[[int], torch.Tensor] | None = None
    router_bias: Callable[[int], torch.Tensor | None] | None = None
    if routers is not None:
        router_weight = lambda i: tensor(routers[i], "weight")  # noqa: E731
        router_bias = lambda i: getattr(routers[i], "bias", None)  # noqa: E731
    requires_grad = {n: getattr(first, n).requires_grad for n in names}
    down = tensor(first, "down_proj").shape  # [E, hidden, I], or [E, I, hidden] when transposed
    sum_dtype = eager_sum_dtype(first, _expert_ffn(first), names, top_k,
                                down[-1] if _flags(first)["is_transposed"] else down[-2])
    return ModelHook(
        family="experts3d",
        layers=layers,
        num_experts=num_experts,
        top_k=top_k,
        layout=layout,
        expert_tensors=lambda m, e: {n: getattr(m, n)[e] for n in names},
        expert_ffn=_expert_ffn,
        expert_stages=_expert_stages,
        strip=_strip,
        install=lambda m, layer: _install(m, layer, sum_dtype),
        restore=lambda m, tensors: _restore(m, tensors, requires_grad),
        router_weight=router_weight,
        router_bias=router_bias,
        next_layer=next_in_stack(model, layers),
        ffn=ffn_spec(first),
        sum_dtype=sum_dtype,
        extra={"previous_implementation": _get_impl(model), "model": model, "experts_class": type(first).__name__},
    )


def _expert_ffn(module: nn.Module):
    """One expert's forward on the weights of a cache slot, op for op as the family's eager loop computes it:
    `F.linear` for [out, in] matrices, `x @ W + b` for transposed biased ones (GPT-OSS), then the module's own
    gate (`_apply_gate`: the default `act(g) * u` over two halves, or GPT-OSS's clamped SwiGLU)."""
    spec = ffn_spec(module)
    between = _between(module)

    def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ w if spec.transposed else F.linear(x, w)
        return y if b is None else y + b

    def ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        h = between(project(x, w[spec.up], w[spec.up_bias] if spec.up_bias else None))
        return project(h, w[spec.down], w[spec.down_bias] if spec.down_bias else None)

    return ffn


def _expert_stages(module: nn.Module) -> ExpertStages | None:
    """`_expert_ffn` cut at its projections: between them the default gate `act(g) * u` (or the activation), which
    works element by element. None for the rest: a gate the engine does not know, or biases (GPT-OSS adds each
    expert's bias after its product, which the staged loop does not do)."""
    spec = ffn_spec(module)
    if spec.kind not in ("gated", "dense") or spec.up_bias or spec.down_bias:
        return None
    return ExpertStages(up=spec.up, down=spec.down, mid=_between(module), transposed=spec.transposed)


def _between(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs between an expert's two projections: the module's own gate (`_apply_gate`), the default gate
    `act(g) * u` over two halves where the module predates `_apply_gate`, or the activation alone (no gate)."""
    if not _flags(module)["has_gate"]:
        return function(module, "act_fn")
    if hasattr(module, "_apply_gate"):
        return function(module, "_apply_gate")
    act = function(module, "act_fn")

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return act(g) * u

    return gate


def _strip(module: nn.Module) -> None:
    for name in tensor_names(module):
        setattr(module, name, empty_parameter(getattr(module, name)))


def _install(module: nn.Module, layer: OffloadedMoELayer, sum_dtype: torch.dtype | None) -> None:
    layer.sum_dtype = sum_dtype
    module.__dict__["_moeoffload_layer"] = layer  # a plain attribute (not a submodule), popped by _restore


def _restore(module: nn.Module, tensors: list[dict[str, torch.Tensor]], requires_grad: dict[str, bool]) -> None:
    module.__dict__.pop("_moeoffload_layer", None)
    for name in tensor_names(module):
        stacked = torch.stack([t[name] for t in tensors])
        setattr(module, name, nn.Parameter(stacked, requires_grad=requires_grad.get(name, False)))


def _get_impl(model: nn.Module):
    getter = getattr(model, "get_experts_implementation", None)
    return getter() if callable(getter) else _config(model)._experts_implementation


def select(model: nn.Module, implementation) -> None:
    """Select an experts implementation on the model and its sub-models (transformers' own setter when present)."""
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # older transformers 5.x
        chosen = implementation if isinstance(implementation, str) else implementation.get("")
        _config(model)._experts_implementation = chosen


def _config(model: nn.Module) -> Any:
    """The model's transformers config: its fields differ by family and version, so it is read by name."""
    return model.config
