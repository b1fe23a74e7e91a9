"""Suite models from the registry: one line per model in a suite file.

The quick tier builds `quick_layers` layers with `quick_overrides` (narrower widths, a smaller vocabulary) so that
a CPU runs it in seconds, keeping each architecture's expert count, top-k and layer structure; the full tier
builds the published config. Weights are synthetic and seeded unless MOEBENCH_WEIGHTS=checkpoint, where the full
tier loads the published checkpoint from the offline Hugging Face cache (by the entry's hub id).
"""

from __future__ import annotations

import os
from typing import Any

from ..suite import ModelSpec
from . import registry
from .loader import load_model

WEIGHTS_ENV = "MOEBENCH_WEIGHTS"


def zoo_model(name: str, quick_layers: int = 2, quick_overrides: dict[str, Any] | None = None,
              seed: int = 0, tiers: tuple[str, ...] = ("quick", "full")) -> ModelSpec:
    entry = registry.get(name)  # an unknown name fails when the suite file is imported, naming the known ones

    def build(tier: str, dtype, device):
        if tier == "full" and os.environ.get(WEIGHTS_ENV) == "checkpoint":
            return load_model(entry.hub_id, source="checkpoint", dtype=dtype, device=device)
        if tier == "full":
            return load_model(entry.name, source="synthetic", dtype=dtype, device=device, seed=seed)
        return load_model(entry.name, source="synthetic", dtype=dtype, device=device, seed=seed,
                          layers=quick_layers, overrides=quick_overrides)

    return ModelSpec(entry.name, build, f"{entry.hub_id} architecture ({entry.source})", tiers=tiers)
