"""Token permutation into expert order and back (un-permutation with the gate weights).

`sort_by_expert` gives the order (the layer computes it once, with its one host sync); `permute` gathers the
token rows in that order so each expert's rows are contiguous for the grouped FFN; `unpermute` gathers each
token's k expert outputs back, weights them with the gate and sums them in float32 (one rounding per output).
On CUDA the gathers are Triton kernels; elsewhere (or with backend="torch") plain torch computes the same thing.
"""

from __future__ import annotations

import torch

from . import use_triton

BLOCK_H = 1024


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


def permute(hidden: torch.Tensor, token_of_row: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[R, H]: row r is hidden[token_of_row[r]]."""
    hidden = hidden.contiguous()
    if not use_triton(hidden, backend):
        return hidden.index_select(0, token_of_row)
    from . import triton_kernels as tk

    rows = token_of_row.numel()
    out = torch.empty((rows, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    if rows:
        index = token_of_row.to(torch.int32).contiguous()
        tk.gather_rows[(rows, triton_cdiv(hidden.shape[1], BLOCK_H))](hidden, index, out, hidden.shape[1],
                                                                        BLOCK_H=BLOCK_H)
    return out


def unpermute(y: torch.Tensor, inverse: torch.Tensor, top_k_weights: torch.Tensor, out_dtype: torch.dtype,
              backend: str = "auto") -> torch.Tensor:
    """[T, H]: out[t] = sum_k w[t, k] * y[inverse[k * T + t]], pairs with inverse -1 contributing nothing."""
    tokens, k = top_k_weights.shape
    hidden_size = y.shape[1]
    if not use_triton(y, backend):
        inv = inverse.view(k, tokens).T.long()  # [T, k]
        valid = inv >= 0
        rows = y.float()[inv.clamp(min=0)]  # [T, k, H]
        w = torch.where(valid, top_k_weights.float(), 0.0)
        return (rows * w[..., None]).sum(dim=1).to(out_dtype)
    from . import triton_kernels as tk

    out = torch.empty((tokens, hidden_size), dtype=out_dtype, device=y.device)
    if tokens:
        tk.combine_rows[(tokens, triton_cdiv(hidden_size, BLOCK_H))](
            y.contiguous(), inverse.contiguous(), top_k_weights.contiguous(), out, tokens, hidden_size,
            K=k, BLOCK_H=BLOCK_H)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
