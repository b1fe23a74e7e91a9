"""Model zoo: the registry of published MoE architectures and the one loader for every weight source.

    from moebench.zoo import load_model, registry
    model, source = load_model("mixtral-8x7b", layers=2)           # synthetic, seeded
    model, source = load_model("/ckpts/my-moe")                     # a local checkpoint folder
    model, source = load_model("mistralai/Mixtral-8x7B-v0.1", source="checkpoint")  # offline HF cache
    model, source = load_model("models/kjv-moe", source="trained")  # the project's trained small MoE
"""

from . import registry
from .loader import (
    CheckpointError,
    WeightSource,
    build_synthetic,
    hf_cache_dir,
    load_model,
    resolve_checkpoint,
    trained_path,
)
from .registry import UnknownModelError, ZooEntry
from .specs import trained_model, zoo_model

__all__ = ["CheckpointError", "UnknownModelError", "WeightSource", "ZooEntry", "build_synthetic", "hf_cache_dir",
           "load_model", "registry", "resolve_checkpoint", "trained_model", "trained_path", "zoo_model"]
