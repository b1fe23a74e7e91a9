"""The exact per-expert loop, staged: every expert's two projections stay GEMMs of their own, the rest of the layer
runs once over all of its experts.

transformers' eager experts forward runs a dozen small ops per expert (gather, projection, gate, projection, gate
weight, `index_add_`). Only the two projections depend on how many rows run together: cuBLAS chooses a kernel, and
with it a summation order, by a GEMM's shape and its operands' alignment. The gather, the activation, the gate
weight and the cast are elementwise, and `index_add_` adds one expert's rows into distinct tokens, so each token
sums its top-k contributions one at a time in ascending expert order. This module runs those parts once per layer:
one gather, then per expert only its two GEMMs, on its own rows, into buffers whose row blocks start on the same
512-byte boundary as the fresh tensors eager's GEMMs read and write, then one activation, one gate multiply, and
the per-token sums in eager's order. The result is eager's, bit for bit, with two launches per expert instead of
about ten: at OLMoE's batch 8 a decode step touches 40 or more experts in each of 16 layers, and launches, not
bytes, set its time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ALIGN_BYTES = 512  # what torch's caching allocator (and its CPU allocator, at 64) gives a fresh tensor at least


@dataclass(frozen=True)
class ExpertStages:
    """One expert's forward cut at its projections. `up` and `down` are layout names of the matrices applied as
    `F.linear(x, W)` (or `x @ W` when `transposed`), with no bias; `mid` is what runs between them, row by row
    (the activation, the gate, a cast), and so may run once over every expert's rows."""

    up: str
    down: str
    mid: Callable[[torch.Tensor], torch.Tensor]
    transposed: bool = False

    def operands(self, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The right-hand sides of the two projections: `F.linear(x, W)` is `torch.mm(x, W.t())`, which the loop
        writes into its buffers with `out=` (the same `mm` on the same operands, without a fresh result)."""
        up, down = weights[self.up], weights[self.down]
        return (up, down) if self.transposed else (up.t(), down.t())


def row_quantum(widths: tuple[int, ...], element_size: int, align: int = ALIGN_BYTES) -> int:
    """The fewest rows r such that a block starting at a multiple of r rows starts `align`-byte aligned in every
    buffer of these row widths (elements)."""
    quantum = 1
    for width in widths:
        row = width * element_size
        quantum = math.lcm(quantum, align // math.gcd(align, row))
    return quantum


def padded_blocks(counts: list[int], quantum: int) -> tuple[list[int], list[int]]:
    """Each expert's block when every block starts at a multiple of `quantum` rows: the start rows (the last entry
    is the buffer's height), and the split sizes `[count0, pad0, count1, pad1, ...]` (`buffer.split(sizes)[::2]`
    gives the blocks as views, in one call)."""
    starts: list[int] = []
    sizes: list[int] = []
    cursor = 0
    for count in counts:
        start = -(-cursor // quantum) * quantum
        if starts:
            sizes.append(start - cursor)
        starts.append(start)
        sizes.append(count)
        cursor = start + count
    starts.append(cursor)
    return starts, sizes


def token_ranks(top_k_index: torch.Tensor) -> torch.Tensor:
    """[T, k]: where each (token, position) falls when the token's experts are put in ascending order. Eager's loop
    adds a token's contributions in this order. A router's top-k names distinct experts; a replaced routing (an
    approximate policy's tap) may repeat one, and then eager adds both in one `index_add_`, in no fixed order: the
    tie goes by position here, which sums the same values, though not always to the same bits."""
    ids = top_k_index
    before = ids[:, None, :] < ids[:, :, None]  # [T, p, q]: expert at q sorts before the one at p
    k = ids.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # q < p
    before |= (ids[:, None, :] == ids[:, :, None]) & earlier
    return before.sum(-1)


def ordered_sum(contributions: torch.Tensor, tokens: torch.Tensor, ranks: torch.Tensor, n_tokens: int,
                k: int, like: torch.Tensor) -> torch.Tensor:
    """Sum row i of `contributions` into token `tokens[i]`, each token's rows in the order of `ranks`, starting
    from zeros: what eager's one `index_add_` per expert computes (each call adds into distinct tokens). The sums run
    in the contributions' dtype (eager's accumulator's), shaped like `like`."""
    dest = ranks * n_tokens + tokens
    table = contributions.new_empty((k * n_tokens, contributions.shape[1]))
    table.index_copy_(0, dest, contributions)
    present = torch.zeros(k * n_tokens, dtype=torch.bool, device=contributions.device)
    present[dest] = True
    out = torch.zeros_like(like, dtype=contributions.dtype)
    for j in range(k):
        rows = slice(j * n_tokens, (j + 1) * n_tokens)
        out = torch.where(present[rows, None], out + table[rows], out)
    return out
