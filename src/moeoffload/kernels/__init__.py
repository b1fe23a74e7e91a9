"""Fused kernels for the engine's MoE layer: token permutation by expert, un-permutation with the gate weights,
and a grouped expert FFN that reads weights from cache slots through an indirection table.

Triton on CUDA; a plain-torch implementation of the same functions everywhere else (and with backend="torch").
They change the order of the floating-point sums against transformers' eager loop, so the layer uses them only
where asked (`kernels=`) and keeps the bit-exact loop as the CPU path.
"""

from __future__ import annotations

import functools
import os

import torch

FFN_KINDS = ("gated-silu", "dense-relu")  # the expert forms the grouped FFN computes


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend not in ("auto", "triton"):
        raise ValueError(f"kernel backend {backend!r} is unknown; use 'auto', 'triton' or 'torch'")
    runnable = triton_importable() and (tensor.is_cuda or interpreting())
    if backend == "triton" and not runnable:
        raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on a CPU); "
                           "install triton or use backend='auto'")
    return runnable and (tensor.is_cuda or backend == "triton")


from .grouped_ffn import (  # noqa: E402
    GROUPED_MM_MAX_GROUPS,
    FFNSpec,
    grouped_ffn,
    grouped_ffn_by_offsets,
    grouped_ffn_by_tiles,
    grouped_mm_usable,
    slot_weights,
    tile_rows,
)
from .routing import (  # noqa: E402
    inverse_order,
    permute,
    route_on_device,
    route_tiles_on_device,
    slot_lookup,
    sort_by_expert,
    unpermute,
)

__all__ = ["FFN_KINDS", "GROUPED_MM_MAX_GROUPS", "FFNSpec", "grouped_ffn", "grouped_ffn_by_offsets",
           "grouped_ffn_by_tiles", "grouped_mm_usable", "inverse_order", "permute", "route_on_device",
           "route_tiles_on_device", "slot_lookup", "slot_weights", "sort_by_expert", "tile_rows", "triton_importable",
           "unpermute", "use_triton"]
