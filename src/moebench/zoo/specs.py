"""Suite models from the registry: one line per model in a suite file.

The quick tier builds `quick_layers` layers with `quick_overrides` (narrower widths, a smaller vocabulary) so that
a CPU runs it in seconds, keeping each architecture's expert count, top-k and layer structure; the full tier
builds the published config. Which weights (`--moebench-weights`, read from MOEBENCH_WEIGHTS):
- synthetic (default): seeded weights, with calibrated routers where the family has a calibration
  (moebench.zoo.calibrate; `routing="uniform"` keeps plain seeded weights);
- checkpoint: the published checkpoint, in either tier: $MOEBENCH_CHECKPOINTS/<model name>/ when that folder is
  set, else the entry's hub id in the offline Hugging Face cache; a missing or unreadable one is an error;
- auto: the checkpoint where it is found, else synthetic weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..suite import ModelSpec
from . import registry
from .calibrate import ROUTING, supports
from .loader import CheckpointError, hf_cache_dir, load_model, resolve_checkpoint

WEIGHTS_ENV = "MOEBENCH_WEIGHTS"
CHECKPOINTS_ENV = "MOEBENCH_CHECKPOINTS"
ROUTING_ENV = "MOEBENCH_ROUTING"  # --moebench-routing: what a suite model's routing="auto" means
WEIGHTS = ("synthetic", "checkpoint", "auto")


def weights_mode() -> str:
    mode = os.environ.get(WEIGHTS_ENV) or "synthetic"
    if mode not in WEIGHTS:
        raise ValueError(f"{WEIGHTS_ENV}={mode!r}: use one of {', '.join(WEIGHTS)} (--moebench-weights)")
    return mode


def routing_mode() -> str:
    """What routing="auto" builds: "calibrated" where the family has a calibration (the default), or "uniform"."""
    mode = os.environ.get(ROUTING_ENV) or "calibrated"
    if mode not in ROUTING:
        raise ValueError(f"{ROUTING_ENV}={mode!r}: use one of {', '.join(ROUTING)} (--moebench-routing)")
    return mode


def find_checkpoint(entry: registry.ZooEntry) -> Path | None:
    """The entry's checkpoint folder: $MOEBENCH_CHECKPOINTS/<name>, else its hub id in the offline cache."""
    named = os.environ.get(CHECKPOINTS_ENV)
    if named and (Path(named) / entry.name).is_dir():
        return Path(named) / entry.name
    try:
        return resolve_checkpoint(entry.hub_id)
    except CheckpointError:
        return None


def zoo_model(name: str, quick_layers: int = 2, quick_overrides: dict[str, Any] | None = None,
              seed: int = 0, tiers: tuple[str, ...] = ("quick", "full"), routing: str = "auto") -> ModelSpec:
    """A suite model. `routing`: "calibrated", "uniform", or "auto" (calibrated where the family has it, unless
    --moebench-routing uniform asks for plain seeded routers)."""
    entry = registry.get(name)  # an unknown name fails when the suite file is imported, naming the known ones
    if routing not in ROUTING + ("auto",):
        raise ValueError(f"{name}: unknown routing {routing!r}; use auto, {', '.join(ROUTING)}")
    def resolved() -> str:  # read when the model is built: the option is set after suite files are imported
        if routing != "auto":
            return routing
        return "calibrated" if routing_mode() == "calibrated" and supports(entry.model_type) else "uniform"

    if weights_mode() == "checkpoint":
        _require_checkpoint(entry)  # when the suite file is read: one error, not one per case

    def build(tier: str, dtype, device):
        mode = weights_mode()
        path = find_checkpoint(entry) if mode != "synthetic" else None
        if mode == "checkpoint":
            path = _require_checkpoint(entry)
        if path is not None:
            return load_model(path, source="checkpoint", dtype=dtype, device=device)
        if tier == "full":
            return load_model(entry.name, source="synthetic", dtype=dtype, device=device, seed=seed,
                              routing=resolved())
        return load_model(entry.name, source="synthetic", dtype=dtype, device=device, seed=seed,
                          layers=quick_layers, overrides=quick_overrides, routing=resolved())

    return ModelSpec(entry.name, build, f"{entry.hub_id} architecture ({entry.source})", tiers=tiers)


def _require_checkpoint(entry: registry.ZooEntry) -> Path:
    path = find_checkpoint(entry)
    if path is None:
        where = f"{os.environ[CHECKPOINTS_ENV]}/{entry.name} nor " if os.environ.get(CHECKPOINTS_ENV) else ""
        raise CheckpointError(f"{entry.name}: --moebench-weights checkpoint, but neither {where}{entry.hub_id!r} in "
                              f"the offline Hugging Face cache ({hf_cache_dir()}) holds it; copy it there, set "
                              f"{CHECKPOINTS_ENV}, or use --moebench-weights auto")
    return path


def trained_model(path: str | None = None, tiers: tuple[str, ...] = ("quick", "full")) -> ModelSpec:
    """The project's trained small MoE (models/kjv-moe: Mixtral's architecture, 4 layers, 8 experts, top-2) as a
    suite model, whatever `--moebench-weights` says: the one model here whose routing and next-token choices come
    from training, so that approximate policies' accuracy and a scheduler's savings are judged on real structure."""
    from .loader import load_model, trained_path

    def build(tier: str, dtype, device):
        return load_model(trained_path(path), source="trained", dtype=dtype, device=device)

    return ModelSpec("kjv-moe", build, "trained small Mixtral-architecture MoE (models/kjv-moe)", tiers=tiers)
