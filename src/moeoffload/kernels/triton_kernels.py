"""The Triton kernels themselves; import this module only where `triton` imports (see kernels.available()).

All weights are read from the cache pool through an indirection table: a tile of rows knows the slot its expert
sits in, so one launch covers every active expert of a layer, wherever the cache put them. Accumulation is in
float32; each output is rounded to its dtype once. Slot offsets are 64-bit (a pool of Mixtral experts passes
2^31 elements after a dozen slots).
"""

from __future__ import annotations

import triton
import triton.language as tl

GATED_SILU = 0  # down(silu(x @ gate^T) * (x @ up^T)), gate and up concatenated as one [2I, H] matrix
DENSE_RELU = 1  # down(relu(x @ wi^T))
NO_ACT = 2  # plain grouped matmul: the down projection


@triton.jit
def gather_rows(src_ptr, index_ptr, dst_ptr, H, BLOCK_H: tl.constexpr):
    """dst[r] = src[index[r]]: the permutation of token rows into expert order."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    src_row = tl.load(index_ptr + row).to(tl.int64)
    offs = block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    values = tl.load(src_ptr + src_row * H + offs, mask=mask)
    tl.store(dst_ptr + row.to(tl.int64) * H + offs, values, mask=mask)


@triton.jit
def combine_rows(y_ptr, inverse_ptr, weight_ptr, out_ptr, T, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[inverse[k, t]] (inverse -1: no expert), in float32, one rounding.

    A gather per token instead of a scatter with atomics: deterministic, and each output written exactly once.
    """
    t = tl.program_id(0)
    block = tl.program_id(1)
    offs = block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(inverse_ptr + k * T + t)
        w = tl.load(weight_ptr + t * K + k).to(tl.float32)
        valid = row >= 0
        w = tl.where(valid, w, 0.0)
        safe_row = tl.where(valid, row, 0).to(tl.int64)
        y = tl.load(y_ptr + safe_row * H + offs, mask=mask & valid, other=0.0)
        acc += y.to(tl.float32) * w
    tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_linear(x_ptr, pool_ptr, out_ptr, tile_ptr, n_tiles, slot_numel, w_offset, N, K: tl.constexpr,
                   ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows, n] = act(x[rows] @ W_slot[n]^T) for every tile of rows, W_slot = pool[slot, w_offset:] as [N', K].

    `tile_ptr` holds three int32 rows of length n_tiles: first row, end row (exclusive) and slot of each tile.
    With ACT == GATED_SILU the weight has 2N rows (gate then up) and both products share the loads of x.
    K is a compile-time constant: one model has two values of it, and a constant loop bound unrolls and pipelines
    (it also keeps Triton's CPU interpreter working with numpy 2).
    """
    tile = tl.program_id(0)
    block_n = tl.program_id(1)
    row0 = tl.load(tile_ptr + tile)
    row_end = tl.load(tile_ptr + n_tiles + tile)
    slot = tl.load(tile_ptr + 2 * n_tiles + tile).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = pool_ptr + slot * slot_numel + w_offset
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_base + cols[None, :].to(tl.int64) * K + ks[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc)
        if ACT == 0:
            w_up = tl.load(w_base + (cols[None, :] + N).to(tl.int64) * K + ks[:, None], mask=w_mask, other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
    if ACT == 0:
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 1:
        acc = tl.maximum(acc, 0.0)
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
