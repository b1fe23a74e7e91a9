"""One loader, three weight sources: `load_model(name_or_path, source=...)` -> (model, WeightSource).

- checkpoint: a local folder (config.json + weights) or a repo id found in the offline Hugging Face cache;
  read with `from_pretrained(..., local_files_only=True)`: nothing is ever downloaded.
- synthetic: a registry architecture with seeded weights, full size or with fewer layers, in any dtype. Built on
  the meta device and materialized one parameter at a time in the target dtype, so the model never exists twice.
- trained: the project's own small MoE checkpoint (models/kjv-moe), a checkpoint source with its own label.

Every report prints `str(WeightSource)`, so a figure always says which weights it came from.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeoffload.errors import UnsupportedModelError

from . import registry

SOURCES = ("auto", "synthetic", "checkpoint", "trained")
REPO_ROOT = Path(__file__).resolve().parents[3]
TRAINED_PATH = Path("models") / "kjv-moe"
TRAIN_COMMAND = "python scripts/train_small_moe.py"
_CHUNK = 1 << 22  # elements per independently seeded block: the draw does not depend on thread count or device
_PROGRESS_MIN_BYTES = 1 << 30
_DRAW_WINDOW_BYTES = 1 << 30  # host bytes drawn ahead of the parameters being placed (moved to the device)


class CheckpointError(FileNotFoundError):
    """A checkpoint folder or cached repo that is missing or cannot be read."""


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights came from; `str()` is what every record and table prints."""

    kind: str  # "synthetic", "checkpoint" or "trained"
    name: str  # registry name or checkpoint path
    seed: int | None = None
    layers: str | None = None  # "2/32" for a depth-reduced synthetic model
    dtype: str | None = None
    reduced: str | None = None  # config overrides of a width-reduced synthetic model
    routing: str | None = None  # "calibrated" routers (moebench.zoo.calibrate); None: seeded uniform weights

    def __str__(self) -> str:
        if self.kind == "synthetic":
            extra = "".join(f", {k}={v}" for k, v in (("layers", self.layers), ("reduced", self.reduced),
                                                      ("routing", self.routing)) if v)
            return f"synthetic(seed={self.seed}{extra}, {self.dtype}):{self.name}"
        return f"{self.kind}:{self.name}"


def load_model(name_or_path: str | os.PathLike, source: str = "auto", *, dtype: torch.dtype | str = torch.float32,
               layers: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
               overrides: dict[str, Any] | None = None, show_progress: bool | None = None, routing: str = "uniform"):
    """Load or build a model in eval mode; returns (model, WeightSource).

    source "auto": an existing folder is a checkpoint, a registry name is synthetic, anything else is looked up
    in the offline Hugging Face cache. `layers`, `seed`, `overrides` and `routing` ("uniform" or "calibrated",
    moebench.zoo.calibrate) apply to synthetic weights only.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown weight source {source!r}; use one of {', '.join(SOURCES)}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    text = str(name_or_path)
    if source == "auto":
        source = "checkpoint" if Path(text).is_dir() or not registry.contains(text) else "synthetic"
    if source == "synthetic":
        return build_synthetic(text, layers=layers, dtype=dtype, device=device, seed=seed, overrides=overrides,
                               show_progress=show_progress, routing=routing)
    if layers is not None or overrides:
        raise ValueError(f"layers/overrides reduce synthetic models only; {source} weights load as published")
    if source == "trained":
        path = trained_path(text if text not in ("", "trained") else None)
        model = _from_pretrained(path, dtype, device)
        return model, WeightSource("trained", _display(path))
    path = resolve_checkpoint(text)
    return _from_pretrained(path, dtype, device), WeightSource("checkpoint", _display(path))


def trained_path(path: str | None = None) -> Path:
    """The trained small model's folder (default models/kjv-moe, relative to the cwd or the repository)."""
    candidates = [Path(path)] if path else [TRAINED_PATH, REPO_ROOT / TRAINED_PATH]
    for p in candidates:
        if (p / "config.json").is_file():
            return p
    raise CheckpointError(f"no trained checkpoint at {candidates[0]}: train it first with `{TRAIN_COMMAND}`")


def hf_cache_dir() -> Path:
    """The hub cache folder, resolved as huggingface_hub does: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_checkpoint(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding config.json: the path itself, or the cached snapshot of a repo id (refs/main first)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint folder {path} has no config.json; point at the folder that "
                                  "save_pretrained() wrote")
        return path
    if name_or_path.count("/") != 1 or path.exists():
        raise CheckpointError(f"no checkpoint folder {path}, and {name_or_path!r} is not a repo id (org/name)"
                              + _known_hint(name_or_path))
    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    repo = cache / ("models--" + name_or_path.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        candidates += sorted(p for p in snapshots.iterdir() if p.is_dir())
    for snap in candidates:
        if (snap / "config.json").is_file():
            return snap
    raise CheckpointError(f"{name_or_path!r} is not in the offline Hugging Face cache {cache} (looked for "
                          f"{repo.name}/snapshots/*/config.json); copy the checkpoint there or pass its folder"
                          + _known_hint(name_or_path))


def _known_hint(name: str) -> str:
    return "" if registry.contains(name) else f"; synthetic models: {', '.join(registry.names())}"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _from_pretrained(path: Path, dtype: torch.dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the config of checkpoint {path}: {type(exc).__name__}: {exc}") from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration" in str(exc):
            raise UnsupportedModelError(f"checkpoint {path}: transformers cannot build a "
                                        f"{type(config).__name__} language model: {exc}") from None
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from None
    return model.to(device).eval().requires_grad_(False)


def build_synthetic(name: str, layers: int | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int = 0, overrides: dict[str, Any] | None = None,
                    show_progress: bool | None = None, routing: str = "uniform"):
    """A registry architecture with seeded weights; returns (model, WeightSource).

    Weights are drawn on the CPU in fixed blocks, each from its own generator seeded by (seed, parameter, block),
    so the same name, depth, overrides, seed and dtype give the same weights on any machine and device. Every
    matrix is uniform with variance 1/fan_in (transformers' fan-in scale), so a router sees logits of unit spread
    after the RMS/layer norm before it: routing spreads over experts instead of collapsing on one. Norm scales are
    1, biases 0, and non-persistent buffers (rotary frequencies) are computed as transformers computes them.
    routing="calibrated" then reshapes the weights so that routing has published structure (zoo.calibrate).
    """
    from .calibrate import ROUTING, calibrate, routing_label

    if routing not in ROUTING:
        raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTING)}")
    entry = registry.get(name)
    meta = entry.meta_model(layers, overrides)
    registry.count_sizes(meta, registry.top_k_of(entry.config))  # raises early if a reduction left no MoE layer
    _materialize(meta, dtype, torch.device(device), seed, show_progress)
    if routing == "calibrated":
        calibrate(meta, seed)
    if hasattr(meta.config, "dtype"):
        meta.config.dtype = dtype
    meta.eval().requires_grad_(False)
    depth = f"{layers}/{entry.num_layers}" if layers is not None else None
    reduced = ",".join(f"{k}={v}" for k, v in sorted((overrides or {}).items())) or None
    return meta, WeightSource("synthetic", entry.name, seed, depth, str(dtype).removeprefix("torch."), reduced,
                              routing_label(meta.config.model_type) if routing == "calibrated" else None)


def _fan_in(module: nn.Module, pname: str, param: torch.Tensor) -> int:
    if param.dim() == 3 and getattr(module, "is_transposed", False):  # GPT-OSS experts: [E, in, out]
        return param.shape[-2]
    return param.shape[-1]


def _is_scale(pname: str, module: nn.Module) -> bool:
    """1-D weights of norms are scales (1); other 1-D parameters (biases, attention sinks) start at 0."""
    return pname == "weight" and ("norm" in type(module).__name__.lower() or "LayerNorm" in type(module).__name__)


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device, seed: int, show_progress) -> None:
    params = list(_unique_parameters(model))
    total = sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size()) for _, _, p in params)
    from tqdm.auto import tqdm

    show = show_progress if show_progress is not None else total >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    bar = tqdm(desc="moebench: synthetic weights", total=total, unit="B", unit_scale=True, disable=not show,
               leave=False)
    done: dict[int, nn.Parameter] = {}
    # Blocks of several parameters are drawn at once: a Switch expert matrix is a single block, so drawing parameter
    # by parameter kept one thread busy (switch-base-256's build took 136 s on the 16-core host of an H100 80GB
    # HBM3). A window of drawn-but-unplaced tensors bounds the extra host memory.
    pending: deque[tuple[nn.Module, str, nn.Parameter, torch.Tensor, list[Future]]] = deque()
    pending_ids: set[int] = set()
    pending_bytes = 0

    def place_oldest() -> None:
        nonlocal pending_bytes
        module, pname, meta_param, t, futures = pending.popleft()
        pending_ids.discard(id(meta_param))
        for f in futures:
            f.result()
        new = nn.Parameter(t.to(device), requires_grad=False)
        done[id(meta_param)] = new
        setattr(module, pname, new)
        pending_bytes -= t.numel() * t.element_size()
        bar.update(t.numel() * t.element_size())

    with torch.no_grad(), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for index, (module, pname, meta_param) in enumerate(params):
            if id(meta_param) in pending_ids:
                while pending:  # its first occurrence must be placed before it is tied
                    place_oldest()
            if id(meta_param) in done:  # tied weights stay tied
                setattr(module, pname, done[id(meta_param)])
                continue
            t = torch.empty(meta_param.shape, dtype=dtype if meta_param.is_floating_point() else meta_param.dtype)
            futures: list[Future] = []
            if t.dim() < 2:
                t.fill_(1.0 if _is_scale(pname, module) else 0.0)
            else:
                bound = math.sqrt(3.0 / _fan_in(module, pname, meta_param))
                futures = _uniform_blocks(t, bound, seed, index, pool)
            pending.append((module, pname, meta_param, t, futures))
            pending_ids.add(id(meta_param))
            pending_bytes += t.numel() * t.element_size()
            while pending_bytes > _DRAW_WINDOW_BYTES and len(pending) > 1:
                place_oldest()
        while pending:
            place_oldest()
    bar.close()
    _materialize_buffers(model, device)


def _unique_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None:
                yield module, pname, p


def _uniform_blocks(t: torch.Tensor, bound: float, seed: int, index: int, pool: ThreadPoolExecutor) -> list[Future]:
    """Start drawing `t`'s blocks on `pool`; returns their futures (each block from its own seeded generator)."""
    blocks = list(t.view(-1).split(_CHUNK))

    def draw(i: int) -> None:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_000_033 + i)
        blocks[i].uniform_(-bound, bound, generator=gen)

    return [pool.submit(draw, i) for i in range(len(blocks))]


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Meta buffers (rotary inv_freq ...) are recomputed by rebuilding their small module from its config."""
    for name, module in model.named_modules():
        metas = {k: b for k, b in module._buffers.items() if b is not None and b.is_meta}
        if not metas:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise UnsupportedModelError(f"cannot compute buffers {sorted(metas)} of {name or 'the model'} "
                                        f"({type(module).__name__}): it has no config to rebuild it from")
        with torch.device("cpu"):
            fresh = type(module)(config)
        for k in metas:
            module._buffers[k] = fresh._buffers[k].to(device)
