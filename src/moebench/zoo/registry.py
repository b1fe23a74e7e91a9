"""The registry: published MoE architectures as data (configs/*.json, each naming the hub config it transcribes).

Sizes are counted on a model built on the meta device, so they cost no memory and follow transformers' own module
layout (tied weights counted once). An *expert* is one routed expert of one MoE layer; shared experts (Qwen-MoE,
DeepSeek) are dense: they run for every token and stay with the dense part.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeoffload.errors import UnsupportedModelError

CONFIG_DIR = Path(__file__).with_name("configs")
GPU_HEADROOM_BYTES = 4 << 30  # CUDA context, activations and KV cache a resident model needs beside its weights
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class UnknownModelError(KeyError):
    """A model name the registry does not hold."""

    def __str__(self) -> str:  # one readable line, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of one architecture (at the depth it was built with)."""

    total_params: int
    expert_params: int  # one routed expert
    moe_layers: int
    experts_per_layer: int
    top_k: int

    @property
    def all_expert_params(self) -> int:
        return self.expert_params * self.moe_layers * self.experts_per_layer

    @property
    def dense_params(self) -> int:
        return self.total_params - self.all_expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: the dense part plus top_k routed experts per MoE layer."""
        return self.dense_params + self.moe_layers * self.top_k * self.expert_params


@dataclass(frozen=True)
class ZooEntry:
    name: str
    hub_id: str
    source: str  # the published file this entry transcribes
    notes: str
    config: dict[str, Any] = field(repr=False)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def num_layers(self) -> int:
        return self.config.get("num_hidden_layers") or self.config["num_layers"]

    def transformers_config(self, layers: int | None = None, overrides: dict[str, Any] | None = None):
        """The transformers config object; `layers` reduces depth (both stacks of an encoder-decoder)."""
        from transformers import CONFIG_MAPPING

        kwargs = {k: v for k, v in self.config.items() if k not in ("torch_dtype", "architectures", "model_type")}
        kwargs.update(overrides or {})
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a reduced vocabulary drops ids beyond it
            if isinstance(kwargs.get(token), int) and kwargs[token] >= kwargs.get("vocab_size", 1 << 62):
                kwargs[token] = None
        if layers is not None:
            if not 1 <= layers <= self.num_layers:
                raise ValueError(f"{self.name}: layers must be between 1 and {self.num_layers}, got {layers}")
            kwargs.update(_depth_fields(kwargs, layers))
        if self.model_type not in CONFIG_MAPPING:
            raise UnsupportedModelError(f"{self.name}: this transformers has no {self.model_type!r} models; "
                                        "upgrade transformers (>= 5.0)")
        cfg = CONFIG_MAPPING[self.model_type](**kwargs)
        cfg.architectures = [self.architecture]
        return cfg

    def model_class(self):
        import transformers

        cls = getattr(transformers, self.architecture, None)
        if cls is None:
            raise UnsupportedModelError(f"{self.name}: this transformers has no {self.architecture}; "
                                        "upgrade transformers (>= 5.0)")
        return cls

    def meta_model(self, layers: int | None = None, overrides: dict[str, Any] | None = None):
        """The model on the meta device: shapes only, no memory, no initialisation."""
        cfg = self.transformers_config(layers, overrides)
        with torch.device("meta"):
            return self.model_class()(cfg)

    @functools.cached_property
    def sizes(self) -> ModelSizes:
        return count_sizes(self.meta_model(), top_k_of(self.config))

    def bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Weight bytes of the whole model in `dtype`."""
        return self.sizes.total_params * dtype_bytes(dtype)

    def expert_bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        return self.sizes.expert_params * dtype_bytes(dtype)

    def fits(self, gpu_bytes: int, dtype: str | torch.dtype = "bfloat16") -> bool:
        """Whether the whole model (every expert resident) fits a GPU of `gpu_bytes`, keeping GPU_HEADROOM_BYTES
        for the CUDA context and activations."""
        return self.bytes(dtype) + GPU_HEADROOM_BYTES <= gpu_bytes


def dtype_bytes(dtype: str | torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def top_k_of(config: dict[str, Any]) -> int:
    return int(config.get("num_experts_per_tok") or config.get("num_selected_experts") or 1)


def _depth_fields(kwargs: dict[str, Any], layers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "num_hidden_layers" in kwargs:
        out["num_hidden_layers"] = layers
    if "num_layers" in kwargs:  # Switch / T5: both stacks
        out["num_layers"] = out["num_decoder_layers"] = layers
        out["num_sparse_encoder_layers"] = out["num_sparse_decoder_layers"] = layers // 2
    if isinstance(kwargs.get("layer_types"), list):
        out["layer_types"] = kwargs["layer_types"][:layers]
    if "max_window_layers" in kwargs:
        out["max_window_layers"] = min(kwargs["max_window_layers"], layers)
    return out


def _expert_modules(model: torch.nn.Module):
    """(module, num_experts, params of one expert) for every routed-experts module of the model."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "experts":
            continue
        stacked = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if stacked and any(p.dim() == 3 for p in stacked):  # transformers 5: experts as [E, ...] tensors
            n = stacked[0].shape[0]
            yield module, n, sum(p.numel() // n for p in module.parameters(recurse=False))
        elif isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList)) and len(module):  # Switch
            first = next(iter(module.children()))
            yield module, len(module), sum(p.numel() for p in first.parameters())


def count_sizes(model: torch.nn.Module, top_k: int) -> ModelSizes:
    """Parameter counts of a built model (any device, meta included)."""
    total = sum(p.numel() for p in model.parameters())
    found = list(_expert_modules(model))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no routed-experts module named 'experts'")
    shapes = {(n, per) for _, n, per in found}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: MoE layers differ in experts/expert size {shapes}")
    (n, per), = shapes
    return ModelSizes(total_params=total, expert_params=per, moe_layers=len(found), experts_per_layer=n, top_k=top_k)


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, ZooEntry]:
    entries = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        entries[data["name"]] = ZooEntry(data["name"], data["hub_id"], data["source"], data.get("notes", ""),
                                         data["config"])
    return entries


def names() -> list[str]:
    """Registry names, Switch models by expert count first, then the others alphabetically."""
    def key(n: str):
        return (0, int(n.rsplit("-", 1)[1]), n) if n.startswith("switch-base-") else (1, 0, n)

    return sorted(_load(), key=key)


def get(name: str) -> ZooEntry:
    """The entry of a registry name or a hub id (case-insensitive)."""
    entries = _load()
    wanted = name.lower()
    for entry in entries.values():
        if wanted in (entry.name.lower(), entry.hub_id.lower()):
            return entry
    raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(names())}")


def contains(name: str) -> bool:
    try:
        get(name)
    except UnknownModelError:
        return False
    return True
