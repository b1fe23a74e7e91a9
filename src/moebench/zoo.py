"""Model zoo: published MoE architectures as data, built with seeded synthetic weights.

The quick tier (CPU) keeps each architecture (widths, heads, experts, vocabulary, capacity, router) and only
reduces depth; the full tier builds the published sizes. No weights are downloaded: the benchmarks measure the
engine, whose cost depends on shapes, not on trained values (routing of trained models is less uniform; see
"doubtful" notes in suites/README.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Published configs, from the HF hub: https://huggingface.co/google/switch-base-8/blob/main/config.json and
# https://huggingface.co/google/switch-base-64/blob/main/config.json (they differ only in num_experts).
_SWITCH_BASE: dict[str, Any] = {
    "d_model": 768,
    "d_ff": 3072,
    "d_kv": 64,
    "num_heads": 12,
    "num_layers": 12,
    "num_decoder_layers": 12,
    "encoder_sparse_step": 2,
    "decoder_sparse_step": 2,
    "vocab_size": 32128,
    "expert_capacity": 64,
    "router_dtype": "float32",
    "relative_attention_num_buckets": 32,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

SWITCH_CONFIGS: dict[str, dict[str, Any]] = {
    "switch-base-8": {**_SWITCH_BASE, "num_experts": 8},
    "switch-base-64": {**_SWITCH_BASE, "num_experts": 64},
}


def switch_config(name: str, num_layers: int | None = None):
    """The transformers config of a published Switch model; `num_layers` (>= 2) reduces both stacks' depth."""
    from transformers import SwitchTransformersConfig

    if name not in SWITCH_CONFIGS:
        raise ValueError(f"unknown Switch model {name!r}; known: {', '.join(SWITCH_CONFIGS)}")
    kwargs = dict(SWITCH_CONFIGS[name])
    if num_layers is not None:
        full = kwargs["num_layers"]
        if not 2 <= num_layers <= full:
            # with sparse step 2, layer 1 is the first MoE layer: fewer than 2 layers would have no experts
            raise ValueError(f"{name}: num_layers must be between 2 and {full}, got {num_layers}")
        kwargs["num_layers"] = kwargs["num_decoder_layers"] = num_layers
    return SwitchTransformersConfig(**kwargs)


def build_switch(name: str, num_layers: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """Build `SwitchTransformersForConditionalGeneration` for `name` with seeded weights, in eval mode.

    Returns (model, source): `source` describes where the weights come from. Weights are drawn after
    `torch.manual_seed(seed)` from a seeded generator, uniform with the variance of transformers' fan-in
    initialisation; the model is first built on the meta device so that transformers' own (slow, multi-GB for
    switch-base-64) initialisation is skipped. Same name, depth, seed and dtype give the same weights.
    """
    from transformers import SwitchTransformersForConditionalGeneration

    cfg = switch_config(name, num_layers)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() < 2:  # layer-norm scales
                param.fill_(1.0)
                continue
            bound = math.sqrt(3.0 / param.shape[-1])  # uniform(-b, b) has variance 1/fan_in
            param.uniform_(-bound, bound, generator=gen)
        for _, buf in model.named_buffers():
            buf.zero_()
    model.eval()
    layers = cfg.num_layers
    full = SWITCH_CONFIGS[name]["num_layers"]
    source = f"synthetic seeded weights, seed {seed}, {layers}/{full} layers per stack, {str(dtype).split('.')[-1]}"
    return model, source
