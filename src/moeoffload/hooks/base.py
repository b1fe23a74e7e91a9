"""What the engine needs to know about one model family's MoE layers, and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layer import ExpertFFN, OffloadedMoELayer
from ..layout import ExpertLayout
from ..staged import ExpertStages
from .ffn import ExpertFFNSpec

T = TypeVar("T")


@dataclass
class ModelHook:
    """The MoE layers of one model and how to move their experts out and route their forward to the engine.

    `layers` are the modules that hold a layer's experts, in model order; layer index i in the engine is
    `layers[i]`. `expert_tensors(module, e)` gives expert e's matrices, `strip(module)` frees them once they
    are stored, `install(module, layer)` routes the module's forward to the engine, `restore(module, tensors)`
    undoes both (tensors: one dict of matrices per expert). `router_weight(i)` is layer i's router matrix
    [num_experts, hidden] (read at call time, wherever the model put it), for predictors that run a router early;
    `router_bias(i)` its bias or None (GPT-OSS's router has one). A predictor computes `top_k(x W^T + b)` only: a
    router that adds more (DeepSeek's group-limited top-k) is approximated, which costs bandwidth, never exactness.
    `ffn` says what one expert computes (kind, tensor names), so a grouped kernel can pick the formula; its
    `name` is `ffn_kind`. `expert_stages(module)` cuts `expert_ffn` at its projections for the staged exact loop
    (`moeoffload.staged`), or None where the form has biases or a gate it cannot cut. `sum_dtype` is the dtype the
    family's eager forward sums a token's top-k contributions in, when not the hidden states' own (Inkling2's
    float32; `hooks.verify` finds it); `install` hands it to the layer.
    """

    family: str
    layers: list[nn.Module]
    num_experts: int
    top_k: int
    layout: ExpertLayout
    expert_tensors: Callable[[nn.Module, int], dict[str, torch.Tensor]]
    expert_ffn: Callable[[nn.Module], ExpertFFN]
    strip: Callable[[nn.Module], None]
    install: Callable[[nn.Module, OffloadedMoELayer], None]
    restore: Callable[[nn.Module, list[dict[str, torch.Tensor]]], None]
    router_weight: Callable[[int], torch.Tensor] | None = None
    router_bias: Callable[[int], torch.Tensor | None] | None = None
    ffn: ExpertFFNSpec | None = None
    expert_stages: Callable[[nn.Module], ExpertStages | None] | None = None
    sum_dtype: torch.dtype | None = None
    next_layer: list[int | None] = field(default_factory=list)  # the MoE layer fed by the same residual stream
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.next_layer:
            self.next_layer = [i + 1 for i in range(len(self.layers) - 1)] + [None]

    @property
    def ffn_kind(self) -> str:
        return self.ffn.name if self.ffn is not None else "custom-gate"


# torch types `nn.Module.__getattr__` as `Tensor | Module`; these read a transformers module's attribute as the kind
# the hook needs, and a model that holds something else gets an error naming the attribute instead of one deep in
# the engine.
def submodule(module: nn.Module, name: str) -> nn.Module:
    """`module.<name>`, which must be a submodule."""
    return _attribute(module, name, nn.Module, "an nn.Module")


def tensor(module: nn.Module, name: str) -> torch.Tensor:
    """`module.<name>`, which must be a tensor (a parameter or a buffer)."""
    return _attribute(module, name, torch.Tensor, "a tensor")


def optional_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` as a tensor, or None where the module has none (a Linear built with bias=False)."""
    return tensor(module, name) if getattr(module, name, None) is not None else None


def integer(module: nn.Module, name: str) -> int:
    """`module.<name>`, which must be an int (an expert count)."""
    return _attribute(module, name, int, "an int")


def function(module: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module.<name>`, which must be callable on a tensor (an activation module or function)."""
    value = getattr(module, name, None)
    if not callable(value):
        raise UnsupportedModelError(f"{type(module).__name__}.{name} is {type(value).__name__}, expected a callable "
                                    "(an activation); moeoffload supports the layouts transformers builds")
    return value


def _attribute(module: nn.Module, name: str, kind: type[T], what: str) -> T:
    value = getattr(module, name, None)
    if not isinstance(value, kind):
        raise UnsupportedModelError(f"{type(module).__name__}.{name} is {type(value).__name__}, expected {what}; "
                                    "moeoffload supports the layouts transformers builds")
    return value


def empty_parameter(like: torch.Tensor) -> nn.Parameter:
    """A zero-size stand-in for a stored weight: keeps dtype and device, holds no memory."""
    return nn.Parameter(torch.empty(0, dtype=like.dtype, device=like.device), requires_grad=False)


def parents(model: nn.Module) -> dict[int, nn.Module]:
    """id(child) -> parent module, for finding the router beside an experts module."""
    return {id(child): parent for parent in model.modules() for child in parent.children()}


def next_in_stack(model: nn.Module, layers: list[nn.Module]) -> list[int | None]:
    """For each MoE layer, the index of the next one in the same stack (None at a stack's end).

    A stack is the module path before its first numbered component ("encoder.block", "decoder.block",
    "model.layers"): an encoder-decoder model has two residual streams, and a router of one says nothing
    about the other.
    """
    names = {id(m): n for n, m in model.named_modules()}

    def stack(module: nn.Module) -> str:
        parts = names[id(module)].split(".")
        return ".".join(p for p in parts[: next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))])

    stacks = [stack(m) for m in layers]
    return [i + 1 if i + 1 < len(layers) and stacks[i + 1] == stacks[i] else None for i in range(len(layers))]
