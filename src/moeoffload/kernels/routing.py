"""Token permutation into expert order and back (un-permutation with the gate weights).

`sort_by_expert` gives the order (the layer computes it once, with its one host sync), or `route_on_device` without
a sync when every expert of the layer is resident (slots, not experts; decode sizes in one launch); `permute`
gathers the token rows in that order so each expert's rows are contiguous for the grouped FFN; `unpermute` gathers
each token's k expert outputs back, weights them with the gate and sums them in float32 (one rounding per output).
On CUDA the gathers are Triton kernels; elsewhere (or with backend="torch") plain torch computes the same thing.
"""

from __future__ import annotations

import torch

from .backend import use_triton

BLOCK_H = 1024
FUSED_ROUTE_MAX_PAIRS = 128  # (token, expert) pairs up to which one Triton launch routes them (all against all)
ROUTE_BLOCK_SLOTS = 64


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(order, counts): flat pair positions `pos * T + token` stably sorted by expert (ids outside
    0..num_experts-1 last), and the rows of each expert. One device->host sync (the counts)."""
    flat = top_k_index.T.reshape(-1)
    flat = torch.where((flat < 0) | (flat >= num_experts), num_experts, flat)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    return order, counts


def inverse_order(order: torch.Tensor, n_valid: int) -> torch.Tensor:
    """int32 [len(order)]: the sorted row of each pair position, -1 for pairs routed to no expert."""
    inverse = torch.full_like(order, -1, dtype=torch.int32)
    inverse[order[:n_valid]] = torch.arange(n_valid, device=order.device, dtype=torch.int32)
    return inverse


def permute(hidden: torch.Tensor, token_of_row: torch.Tensor, backend: str = "auto", divisor: int = 1) -> torch.Tensor:
    """[R, H]: row r is hidden[token_of_row[r] // divisor] (`divisor` k: rows given as token-major pair positions)."""
    hidden = hidden.contiguous()
    if not use_triton(hidden, backend):
        return hidden.index_select(0, token_of_row if divisor == 1 else token_of_row // divisor)
    from . import triton_kernels as tk

    rows = token_of_row.numel()
    out = torch.empty((rows, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    if rows:
        tk.gather_rows[(rows, triton_cdiv(hidden.shape[1], BLOCK_H))](hidden, token_of_row.contiguous(), out,
                                                                        hidden.shape[1], divisor, BLOCK_H=BLOCK_H)
    return out


def unpermute(y: torch.Tensor, inverse: torch.Tensor, top_k_weights: torch.Tensor, out_dtype: torch.dtype,
              backend: str = "auto", token_major: bool = False, limit: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H]: out[t] = sum_k w[t, k] * y[inverse[k * T + t]] (`token_major`: inverse[t * K + k]), summed in float32.

    A pair contributes nothing when its row is -1 or, given `limit` (a one-element device tensor), at or past it:
    rows the grouped FFN left undefined, never read."""
    tokens, k = top_k_weights.shape
    hidden_size = y.shape[1]
    stride_t, stride_k = (k, 1) if token_major else (1, tokens)
    if not use_triton(y, backend):
        inv = inverse.as_strided((tokens, k), (stride_t, stride_k)).long()  # [T, k]
        valid = inv >= 0
        if limit is not None:
            valid &= inv < limit
        rows = y.float()[inv.clamp(0, max(y.shape[0] - 1, 0))]  # [T, k, H]
        weighted = rows * top_k_weights.float()[..., None]
        return torch.where(valid[..., None], weighted, 0.0).sum(dim=1).to(out_dtype)
    from . import triton_kernels as tk

    out = torch.empty((tokens, hidden_size), dtype=out_dtype, device=y.device)
    if tokens:
        tk.combine_rows[(tokens, triton_cdiv(hidden_size, BLOCK_H))](
            y.contiguous(), inverse.contiguous(), top_k_weights.contiguous(),
            inverse if limit is None else limit, out, tokens, hidden_size, stride_t, stride_k, K=k,
            HAS_LIMIT=limit is not None, BLOCK_H=BLOCK_H)
    return out


def slot_lookup(table: torch.Tensor, n_slots: int) -> torch.Tensor:
    """int32 [E + 1]: the slot of each expert (`table`), then `n_slots` for "no expert": indexed with ids clamped to
    -1..E, a router's id outside 0..E-1 (a token dropped by capacity) lands there and sorts after every slot."""
    sentinel = torch.full((1,), n_slots, dtype=torch.int32, device=table.device)
    return torch.cat([table.to(torch.int32), sentinel])


def route_on_device(top_k_index: torch.Tensor, slot_of_id: torch.Tensor, slot_ends: torch.Tensor,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, inverse, offs) without a host sync. `order`: token-major pair positions `t * K + k` stably sorted by
    slot, pairs with no expert last; `inverse[p]`: the row of pair p in that order; `offs` int32 [n_slots]: the end
    of each slot's rows (torch's grouped GEMM offsets). `slot_of_id` from `slot_lookup`; `slot_ends`: int32
    1..n_slots. At decode sizes one Triton launch does it all (the host's launches bound a decode step); else six
    torch kernels: clamp, lookup, sort, binary search, and a scatter of a range for the inverse."""
    order, inverse, offs, _ = _route(top_k_index, slot_of_id, slot_ends, None, backend)
    return order, inverse, offs


def route_tiles_on_device(top_k_index: torch.Tensor, slot_of_id: torch.Tensor, slot_ends: torch.Tensor, tile_m: int,
                          backend: str = "auto", landing: torch.Tensor | None = None, flag: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route_on_device`'s three, and `tiles` int32 [3, pairs] for `grouped_ffn_by_tiles`, also without a sync: one
    entry per sorted row; a row that starts a run of `tile_m` rows of one slot holds (row, the slot's end row,
    slot), every other row (row, row, 0), an empty tile. The FFN then runs over the routed slots only: its launch
    does not grow with the pool, as torch's grouped GEMM over `offs` does (every slot is a group).

    With `landing` (int32 [n_slots]: the sequence number of the copy into each slot) and `flag` (int32 [1]: the
    last sequence number whose copies have landed), `tiles` is [6, pairs]: rows 0-2 the tiles of slots whose copy
    has landed, rows 3-5 the others, so that the FFN of the first can run before the wait for the copies. (Its torch
    form reads `flag` on the host: a sync on CUDA.)"""
    return _route(top_k_index, slot_of_id, slot_ends, tile_m, backend, landing, flag)


def _route(top_k_index, slot_of_id, slot_ends, tile_m, backend, landing=None, flag=None):
    pairs = top_k_index.numel()
    n_slots = slot_ends.numel()
    device = top_k_index.device
    if use_triton(top_k_index, backend) and pairs <= FUSED_ROUTE_MAX_PAIRS:
        from . import triton_kernels as tk

        order = torch.empty(pairs, dtype=torch.int32, device=device)
        inverse = torch.empty_like(order)
        offs = torch.empty(n_slots, dtype=torch.int32, device=device)
        split = landing is not None
        tiles = torch.empty((6 if split else 3, pairs), dtype=torch.int32, device=device) if tile_m else None
        block_s = max(16, 1 << (pairs - 1).bit_length())
        tk.route_pairs[(triton_cdiv(n_slots, ROUTE_BLOCK_SLOTS),)](
            top_k_index.contiguous(), slot_of_id, order, inverse, offs, tiles if tiles is not None else order,
            landing if split else order, flag if split else order, pairs, slot_of_id.numel(), n_slots,
            BLOCK_S=block_s, BLOCK_SLOTS=ROUTE_BLOCK_SLOTS, TILE_M=tile_m or 1, TILES=tiles is not None, SPLIT=split)
        return order, inverse, offs, tiles
    ids = top_k_index.reshape(-1).clamp(-1, slot_of_id.numel() - 1)
    slots, order = torch.sort(slot_of_id[ids], stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(pairs, device=device))
    offs = torch.searchsorted(slots, slot_ends, out_int32=True)
    tiles = None
    if tile_m:
        rows = torch.arange(pairs, dtype=torch.int32, device=device)
        first = torch.searchsorted(slots, slots, out_int32=True)
        end = torch.searchsorted(slots, slots, right=True, out_int32=True)
        starts = ((rows - first) % tile_m == 0) & (slots >= 0) & (slots < n_slots)
        parts = [starts]
        if landing is not None:
            lands = landing[slots.clamp(0, n_slots - 1)].to(torch.int64)
            ready = ((int(flag.item()) - lands + (1 << 31)) % (1 << 32) - (1 << 31)) >= 0  # int32 difference
            parts = [starts & ready, starts & ~ready]
        tiles = torch.cat([torch.stack([rows, torch.where(part, end, rows), torch.where(part, slots, 0)])
                           for part in parts]).to(torch.int32)
    return order, inverse, offs, tiles


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
