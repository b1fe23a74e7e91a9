"""Hooks into transformers model families. `discover(model)` returns the first family that recognises it."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from . import experts3d, switch
from .base import ModelHook
from .ffn import ExpertFFNSpec

FAMILIES = (switch.discover, experts3d.discover)


def discover(model: nn.Module) -> ModelHook:
    for find in FAMILIES:
        hook = find(model)
        if hook is not None:
            return hook
    raise UnsupportedModelError(
        f"{type(model).__name__} has no MoE layers moeoffload recognises; supported: Switch Transformers "
        "(ModuleDict experts) and transformers 5 models with 3-D Experts modules (Mixtral, Qwen-MoE, Qwen3-MoE, OLMoE, "
        "DeepSeek-V2, GPT-OSS)"
    )


__all__ = ["ExpertFFNSpec", "ModelHook", "discover"]
