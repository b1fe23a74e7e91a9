"""Fused kernels for the engine's MoE layer: token permutation by expert, un-permutation with the gate weights,
and a grouped expert FFN that reads weights from cache slots through an indirection table.

Triton on CUDA; a plain-torch implementation of the same functions everywhere else (and with backend="torch").
They change the order of the floating-point sums against transformers' eager loop, so the layer uses them only
where asked (`kernels=`) and keeps the bit-exact loop as the CPU path.
"""

from __future__ import annotations

from .backend import FFN_KINDS, interpreting, triton_importable, use_triton
from .grouped_ffn import (
    GROUPED_MM_MAX_GROUPS,
    FFNSpec,
    grouped_ffn,
    grouped_ffn_by_offsets,
    grouped_ffn_by_tiles,
    grouped_mm_usable,
    slot_weights,
    tile_rows,
)
from .routing import (
    inverse_order,
    permute,
    route_on_device,
    route_tiles_on_device,
    slot_lookup,
    sort_by_expert,
    unpermute,
)

__all__ = ["FFN_KINDS", "GROUPED_MM_MAX_GROUPS", "FFNSpec", "grouped_ffn", "grouped_ffn_by_offsets",
           "grouped_ffn_by_tiles", "grouped_mm_usable", "interpreting", "inverse_order", "permute", "route_on_device",
           "route_tiles_on_device", "slot_lookup", "slot_weights", "sort_by_expert", "tile_rows", "triton_importable",
           "unpermute", "use_triton"]
