"""Grouped expert FFN over cache slots: one launch per projection for all active experts of a layer.

Rows of `x` come sorted by expert (see routing.permute); a group is (first row, end row, slot) and says which
cache slot holds that expert's weights. The weights are read straight out of the flat pool ([n_slots, numel],
see layout.py): no gather of weights, no per-expert launch. The intermediate activation is rounded to the input
dtype once (as eager does after its first linear); accumulation is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import ExpertLayout
from .backend import FFN_KINDS, use_triton

Group = tuple[int, int, int]  # (first row, end row, slot)
GROUPED_MM_MAX_GROUPS = 1024  # torch._grouped_mm refuses more groups ("Can't process more than 1024 groups")


@dataclass(frozen=True)
class FFNSpec:
    """Where the two matrices of one expert sit inside its slot, and which form the FFN has."""

    kind: str
    hidden: int
    intermediate: int
    w1_offset: int  # gate_up [2I, H] (gated-silu) or wi [I, H] (dense-relu)
    w2_offset: int  # down / wo [H, I]
    slot_numel: int

    @classmethod
    def from_layout(cls, kind: str, layout: ExpertLayout, up: str | None = None, down: str | None = None) -> FFNSpec:
        """`up`/`down`: layout names of the two matrices (default: the first two in packing order)."""
        if kind not in FFN_KINDS:
            raise ValueError(f"the grouped FFN has no form {kind!r}; supported: {', '.join(FFN_KINDS)}")
        up = up or layout.names[0]
        down = down or layout.names[1]
        offsets = dict(zip(layout.names, (sum(layout.numels[:i]) for i in range(len(layout.names)))))
        shapes = dict(zip(layout.names, layout.shapes))
        if up not in shapes or down not in shapes:
            raise ValueError(f"layout {layout.names} has no matrices named {up!r} and {down!r}")
        (rows1, hidden), (hidden2, inter) = shapes[up], shapes[down]
        expect_rows1 = 2 * inter if kind == "gated-silu" else inter
        if hidden2 != hidden or rows1 != expect_rows1:
            raise ValueError(f"layout {shapes} is not a {kind} expert "
                             f"({up} [{'2I' if kind == 'gated-silu' else 'I'}, H], {down} [H, I])")
        return cls(kind, hidden, inter, offsets[up], offsets[down], layout.numel)


def block_config(max_rows: int, n: int, k: int, gated: bool) -> dict:
    """Tile sizes from the largest group (not the launch), so a row's sums do not depend on how the experts of a
    layer were split into waves. Few rows: the kernel streams weights (memory-bound), narrow N tiles fill the SMs."""
    if max_rows <= 32:
        bm = 16 if max_rows <= 16 else 32
        return dict(BLOCK_M=bm, BLOCK_N=64 if gated else 32, BLOCK_K=128, num_warps=4, num_stages=4)
    if max_rows <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128 if not gated else 64, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128 if not gated else 64, BLOCK_K=64, num_warps=8, num_stages=3)


def grouped_ffn(spec: FFNSpec, x: torch.Tensor, pool: torch.Tensor, groups: Sequence[Group], out: torch.Tensor,
                max_rows: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Write out[first:end] = FFN_slot(x[first:end]) for every group; other rows of `out` are left alone."""
    groups = [g for g in groups if g[1] > g[0]]
    if not groups:
        return out
    if x.shape[1] != spec.hidden or pool.shape[1] != spec.slot_numel:
        raise ValueError(f"grouped FFN got x {tuple(x.shape)} and pool {tuple(pool.shape)} for a spec of hidden "
                         f"{spec.hidden} and {spec.slot_numel} elements per slot")
    max_rows = max_rows or max(end - first for first, end, _ in groups)
    if not use_triton(x, backend):
        # the same tiles as the kernel and as `grouped_ffn_by_tiles`: a row's GEMM then has the same shape
        # whichever of them computes it, so the plain-torch form gives the same bits too
        tile_m = tile_rows(max_rows)
        chunks = [(row, min(end, row + tile_m), slot)
                  for first, end, slot in groups for row in range(first, end, tile_m)]
        return _grouped_ffn_torch(spec, x, pool, chunks, out)
    return _grouped_linears(spec, x, pool, _tiles(groups, tile_rows(max_rows), x.device), max_rows, out)


def tile_rows(max_rows: int) -> int:
    """Rows per tile of the grouped kernels when no group has more than `max_rows` (`block_config`'s BLOCK_M)."""
    return block_config(max_rows, 1, 1, False)["BLOCK_M"]


def grouped_ffn_by_tiles(spec: FFNSpec, x: torch.Tensor, pool: torch.Tensor, tiles: torch.Tensor, max_rows: int,
                         backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """FFN of the rows each tile names, with `tiles` built on the device (`routing.route_tiles_on_device` with
    tile_m = `tile_rows(max_rows)`; `max_rows`, the most rows one slot is expected to have, picks the tiles' size
    and blocks, and must be the same number in both calls): no host sync,
    and the launch covers the routed slots only, however many the pool has. Rows no tile covers come out
    undefined (`out`'s, when given). Elsewhere (CPU, tests) the same function by a loop over the tiles (which reads
    them: one sync)."""
    if out is None:
        out = torch.empty((x.shape[0], spec.hidden), dtype=x.dtype, device=x.device)
    if not use_triton(x, backend):
        tile_m = tile_rows(max_rows)
        firsts, ends, slots = tiles.tolist()
        groups = [(a, min(b, a + tile_m), s) for a, b, s in zip(firsts, ends, slots) if b > a]
        return _grouped_ffn_torch(spec, x, pool, groups, out)
    return _grouped_linears(spec, x, pool, tiles, max_rows, out)


def _grouped_linears(spec: FFNSpec, x: torch.Tensor, pool: torch.Tensor, tiles: torch.Tensor, max_rows: int,
                     out: torch.Tensor) -> torch.Tensor:
    """The two Triton launches of the FFN (up with the activation, then down) over a device tile table."""
    from . import triton_kernels as tk

    x = x.contiguous()
    gated = spec.kind == "gated-silu"
    hidden_act = torch.empty((x.shape[0], spec.intermediate), dtype=x.dtype, device=x.device)
    stages = (
        (x, hidden_act, spec.w1_offset, spec.intermediate, spec.hidden, tk.GATED_SILU if gated else tk.DENSE_RELU),
        (hidden_act, out, spec.w2_offset, spec.hidden, spec.intermediate, tk.NO_ACT),
    )
    n_tiles = tiles.shape[1]
    for src, dst, offset, n, k, act in stages:
        cfg = block_config(max_rows, n, k, act == tk.GATED_SILU)
        grid = (n_tiles, -(-n // cfg["BLOCK_N"]))
        tk.grouped_linear[grid](src, pool, dst, tiles, n_tiles, spec.slot_numel, offset, n, k, ACT=act, **cfg)
    return out


def _tiles(groups: Sequence[Group], block_m: int, device: torch.device) -> torch.Tensor:
    first, end, slot = [], [], []
    for g_first, g_end, g_slot in groups:
        for row in range(g_first, g_end, block_m):
            first.append(row)
            end.append(g_end)
            slot.append(g_slot)
    return torch.tensor([first, end, slot], dtype=torch.int32).to(device, non_blocking=True)


def _grouped_ffn_torch(spec: FFNSpec, x: torch.Tensor, pool: torch.Tensor, groups: Sequence[Group],
                       out: torch.Tensor) -> torch.Tensor:
    """The same function in plain torch (float32 accumulation, intermediate rounded to x's dtype)."""
    inter, hidden = spec.intermediate, spec.hidden
    for first, end, slot in groups:
        flat = pool[slot]
        rows1 = 2 * inter if spec.kind == "gated-silu" else inter
        w1 = flat[spec.w1_offset : spec.w1_offset + rows1 * hidden].view(rows1, hidden).float()
        w2 = flat[spec.w2_offset : spec.w2_offset + hidden * inter].view(hidden, inter).float()
        h = x[first:end].float() @ w1.T
        if spec.kind == "gated-silu":
            gate, up = h[:, :inter], h[:, inter:]
            h = torch.nn.functional.silu(gate) * up
        else:
            h = torch.relu(h)
        h = h.to(x.dtype).float()
        out[first:end] = (h @ w2.T).to(out.dtype)
    return out


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """torch's grouped GEMM (what transformers' grouped_mm experts use): CUDA, bf16, compute capability 9+."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def slot_weights(spec: FFNSpec, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both matrices of every slot as strided views of the pool ([n_slots, out, in] each): no copy."""
    n, inter, hidden = pool.shape[0], spec.intermediate, spec.hidden
    rows1 = 2 * inter if spec.kind == "gated-silu" else inter
    w1 = pool[:, spec.w1_offset : spec.w1_offset + rows1 * hidden].view(n, rows1, hidden)
    w2 = pool[:, spec.w2_offset : spec.w2_offset + hidden * inter].view(n, hidden, inter)
    return w1, w2


def grouped_ffn_by_offsets(spec: FFNSpec, x: torch.Tensor, pool: torch.Tensor, offs: torch.Tensor,
                           weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """FFN of every slot over its rows of `x` (sorted by slot; slot i owns rows offs[i-1]:offs[i], a device
    tensor), without reading the offsets on the host: torch._grouped_mm over every slot of `pool`, empty ones
    included (a layer passes the window of slots its experts occupy; at most GROUPED_MM_MAX_GROUPS).
    Rows past offs[-1] come out undefined. Elsewhere (CPU, tests) the same function by a loop over the groups.
    `weights`: `slot_weights(spec, pool)`, when the caller keeps them (a layer calls this once per token step)."""
    if grouped_mm_usable(x):
        w1, w2 = weights or slot_weights(spec, pool)
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        act = _activation(spec, h)
        return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    out = torch.zeros((x.shape[0], spec.hidden), dtype=x.dtype, device=x.device)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return _grouped_ffn_torch(spec, x, pool, [(a, b, s) for s, (a, b) in enumerate(zip(starts, ends)) if b > a], out)


def _activation(spec: FFNSpec, h: torch.Tensor) -> torch.Tensor:
    if spec.kind == "gated-silu":
        gate, up = h[:, : spec.intermediate], h[:, spec.intermediate :]
        return torch.nn.functional.silu(gate) * up
    return torch.relu(h)
