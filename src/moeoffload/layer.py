"""OffloadedMoELayer: one MoE layer's expert computation over the cache, through the paths its plan allows.

The layer owns what every path reads (its index, the cache, the grouped kernels' view of its expert form, the
prefetcher and the router tap) and, per call, hands the call to the first path that serves it: the device paths
when they can (no host sync), else the host path of the plan's kernels (`moeoffload.paths`). Which paths exist is
the plan's decision (`moeoffload.plan`), made once; which one serves a call depends only on the call's size and on
what the cache holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import kernels as _kernels
from .cache import ExpertCache, PrecisionCaches
from .paths import DequantizingLoop, ExactLoop, FetchedOnDevice, GroupedOnHost, HostAssisted, ResidentOnDevice
from .paths.common import drop_prefetcher
from .plan import ExecutionPlan
from .staged import ExpertStages

if TYPE_CHECKING:
    from .hostexperts import HostExperts

ExpertFFN = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Prefetcher = Callable[[int, torch.Tensor], None]  # (this layer's index, its MoE input) -> starts copies
# (layer index, MoE input [T, H], router's ids [T, k], router's weights [T, k]) -> None to keep the router's choice,
# or (ids, weights) to replace it. Traces and oracles only look (None); a data-aware policy replaces (approximate).
RouterTap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


def grouped_spec(ffn, layout) -> _kernels.FFNSpec | None:
    """The grouped kernels' view of a hook's expert form (`hooks.ffn.ExpertFFNSpec`), or None when they cannot
    compute it (unknown kind, biases, transposed or interleaved storage): such models run the exact loop."""
    name = getattr(ffn, "name", ffn)
    if name not in _kernels.FFN_KINDS:
        return None
    if any(getattr(ffn, flag, None) for flag in ("up_bias", "down_bias", "transposed", "interleaved")):
        return None
    try:
        return _kernels.FFNSpec.from_layout(name, layout, getattr(ffn, "up", None), getattr(ffn, "down", None))
    except ValueError:
        return None


class OffloadedMoELayer:
    def __init__(self, layer_idx: int, num_experts: int, cache: ExpertCache, expert_ffn: ExpertFFN,
                 plan: ExecutionPlan, prefetcher: Prefetcher | None = None, router_tap: RouterTap | None = None,
                 ffn=None, stages: ExpertStages | None = None, host: HostExperts | None = None,
                 precisions: PrecisionCaches | None = None, full_precision_gate: float | None = None):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.cache = cache
        self.plan = plan
        self.prefetcher = prefetcher
        self.router_tap = router_tap
        self.sum_dtype: torch.dtype | None = None  # eager sums a token's top-k in this dtype (None: hidden's)
        self.spec = grouped_spec(ffn, cache.store.full_layout)  # a quantized store's experts: as full ones
        if plan.grouped and self.spec is None:
            raise ValueError(f"plan {plan.label!r} needs the grouped kernels, which do not compute this layer's expert "
                             "form; make the plan with moeoffload.plan.make_plan")
        self.host_path = self._host_path(expert_ffn, stages, host, precisions, full_precision_gate)
        self.device_paths: list[FetchedOnDevice | ResidentOnDevice] = []
        if plan.precision != "full":
            return  # the low-precision path routes every call itself
        if plan.fetch == "device":
            self.device_paths.append(FetchedOnDevice(self))
        elif plan.grouped:
            self.device_paths.append(ResidentOnDevice(self))

    def _host_path(self, expert_ffn: ExpertFFN, stages: ExpertStages | None, host: HostExperts | None,
                   precisions: PrecisionCaches | None,
                   full_precision_gate: float | None) -> ExactLoop | GroupedOnHost | HostAssisted | DequantizingLoop:
        """The path that serves a call after one device->host sync: the plan's kernels over the cache, wrapped by
        the host's share of the misses (a host-assisted plan), or the low-precision copies' own loop."""
        plan = self.plan
        if plan.precision != "full":
            if precisions is None:
                raise ValueError(f"plan {plan.label!r} copies low-precision experts: pass their PrecisionCaches")
            return DequantizingLoop(self, expert_ffn, precisions, full_precision_gate)
        path: ExactLoop | GroupedOnHost = GroupedOnHost(self) if plan.grouped else ExactLoop(self, expert_ffn, stages)
        if not plan.host_misses:
            return path
        if host is None:
            raise ValueError(f"plan {plan.label!r} computes misses on the host: pass host=HostExperts(...)")
        return HostAssisted(self, path, expert_ffn, host)

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.router_tap is not None:
            top_k_index, top_k_weights = self._tap(hidden, top_k_index, top_k_weights)
        for path in self.device_paths:
            if path.serves(top_k_index):
                return path(hidden, top_k_index, top_k_weights)
        return self.host_path(hidden, top_k_index, top_k_weights)

    def close(self) -> None:
        """Drop the paths: they refer back to this layer and hold views of the cache's pool, so without this the
        pool would live until the cyclic garbage collector runs, and a larger pool next could find no room."""
        self.device_paths = []
        del self.host_path

    def prefetch(self, hidden: torch.Tensor) -> None:
        """Start the next layer's copies before this layer computes; a prefetcher that raises is dropped (the output
        is unaffected either way)."""
        try:
            self.prefetcher(self.layer_idx, hidden)  # type: ignore[misc]
        except Exception as exc:
            drop_prefetcher(self, exc, stacklevel=6)

    def _tap(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The router tap's routing, or the router's own. A replacement naming experts that do not exist (or of
        the wrong shape) is never used as routing: the tap is dropped with a warning and the router decides."""
        try:
            out = self.router_tap(self.layer_idx, hidden, top_k_index, top_k_weights)  # type: ignore[misc]
            if out is None:
                return top_k_index, top_k_weights
            ids, weights = out
            if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
                raise ValueError(f"replacement routing of shape {tuple(ids.shape)}/{tuple(weights.shape)} for "
                                 f"{hidden.shape[0]} tokens")
            if ids.numel() and bool(((ids < 0) | (ids > self.num_experts)).any()):
                raise ValueError(f"replacement routing names experts outside 0..{self.num_experts - 1}")
            return ids, weights.to(top_k_weights.dtype)
        except Exception as exc:
            warnings.warn(f"moeoffload: router tap of MoE layer {self.layer_idx} failed ({type(exc).__name__}: "
                          f"{exc}); this layer now follows its router", RuntimeWarning, stacklevel=3)
            self.router_tap = None
            return top_k_index, top_k_weights
