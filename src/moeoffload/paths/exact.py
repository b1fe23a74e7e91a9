"""ExactLoop: the per-expert loop in transformers eager's order, bit-identical to the unoffloaded model.

The experts a call needs are made resident in waves no larger than the cache, in ascending expert order, so the sum
over experts accumulates in eager's order whatever the budget or the eviction rule. Where the hook can cut its
expert form at the projections (`moeoffload.staged`), calls with many experts run staged: per expert only its two
GEMMs, the rest once per layer, with the same bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..staged import ExpertStages, ordered_sum, padded_blocks, row_quantum, token_ranks
from .common import Route, host_route, waves

if TYPE_CHECKING:
    from ..layer import ExpertFFN, OffloadedMoELayer

# Below this many experts in one call the per-expert loop runs, above it the staged loop: the staged loop saves about
# eight launches per expert but adds about twenty per call (benchmarks/exact_loop.py; results in
# benchmarks/RESULTS.md).
STAGED_MIN_EXPERTS = 8


class ExactLoop:
    def __init__(self, layer: OffloadedMoELayer, expert_ffn: ExpertFFN, stages: ExpertStages | None):
        self.layer = layer
        self.expert_ffn = expert_ffn
        self.stages = stages
        self._slot_operands: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if stages is not None:
            layout = layer.cache.store.full_layout
            shapes = dict(zip(layout.names, layout.shapes))
            up, down = shapes[stages.up], shapes[stages.down]  # their widths: hidden, the intermediate, twice it
            self.quantum = row_quantum((*up, *down), torch.empty((), dtype=layout.dtype).element_size())
            self._up_width = up[-1] if stages.transposed else up[0]
            self._out_width = down[-1] if stages.transposed else down[0]

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 route: Route | None = None) -> torch.Tensor:
        """`route`: the call's `host_route` (eager's order), when the caller routed it already (HostAssisted)."""
        layer = self.layer
        layer.cache.enter_layer(layer.layer_idx)
        needed, starts, order = route if route is not None else host_route(top_k_index, layer.num_experts)
        staged = len(needed) >= STAGED_MIN_EXPERTS and not (torch.is_grad_enabled() and hidden.requires_grad)
        if self.stages is not None and staged:  # (mm(out=), which it writes with, has no autograd)
            return self._staged(hidden, top_k_index, top_k_weights, needed, starts, order)
        out = torch.zeros_like(hidden, dtype=layer.sum_dtype)
        tokens = hidden.shape[0]
        for first, slots in waves(layer, needed, hidden):
            for i, slot in enumerate(slots):
                pairs = order[starts[first + i] : starts[first + i + 1]]
                tok, pos = pairs % tokens, pairs // tokens
                y = self.expert_ffn(hidden[tok], layer.cache.weights(slot))
                y = y * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out.to(hidden.dtype)

    def _staged(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                needed: list[int], starts: list[int], order: torch.Tensor) -> torch.Tensor:
        """The loop with the per-expert work cut to its two projections (`moeoffload.staged`: why exact)."""
        y: torch.Tensor | None = None
        y_blocks: tuple[torch.Tensor, ...] = ()
        stages, tokens, k = self.stages, hidden.shape[0], top_k_index.shape[1]
        assert stages is not None
        n = starts[-1]
        if n == 0:
            return torch.zeros_like(hidden)
        pairs = order[:n]
        tok, pos = pairs % tokens, pairs // tokens
        counts = [starts[i + 1] - starts[i] for i in range(len(needed))]
        blocks, sizes = padded_blocks(counts, self.quantum)  # every expert's rows start 512-byte aligned, as in eager
        x, rows = self._gather(hidden, tok, blocks, starts, counts, n)
        height = blocks[-1]
        up = x.new_empty((height, self._up_width), dtype=self.layer.cache.pool.dtype)
        x_blocks, up_blocks = x.split(sizes)[::2], up.split(sizes)[::2]
        for first, slots in waves(self.layer, needed, hidden):
            last = first + len(slots) - 1
            operands = [self._operands(slot) for slot in slots]
            for i, (w_up, _) in enumerate(operands):
                torch.mm(x_blocks[first + i], w_up, out=up_blocks[first + i])
            mid = stages.mid(up[blocks[first] : blocks[last] + counts[last]])  # fresh: aligned like `up`
            if y is None:
                y = mid.new_empty((height, self._out_width))
                y_blocks = y.split(sizes)[::2]
            mid_blocks = mid.split(sizes[2 * first : 2 * last + 1])[::2]
            for i, (_, w_down) in enumerate(operands):
                torch.mm(mid_blocks[i], w_down, out=y_blocks[first + i])
        assert y is not None
        y = y if rows is None else y[rows]
        contributions = (y * top_k_weights[tok, pos, None]).to(self.layer.sum_dtype or hidden.dtype)
        ranks = token_ranks(top_k_index).T.reshape(-1)[pairs]
        return ordered_sum(contributions, tok, ranks, tokens, k, hidden).to(hidden.dtype)

    @staticmethod
    def _gather(hidden: torch.Tensor, tok: torch.Tensor, blocks: list[int], starts: list[int], counts: list[int],
                n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of every pair in padded block order, and the padded row of each pair (None when no padding
        moved any). Padding rows hold token 0: no GEMM reads them."""
        if blocks[-1] == n:
            return hidden[tok], None
        plan = torch.tensor([[b - s for b, s in zip(blocks, starts[:-1])], counts]).to(hidden.device)
        rows = torch.arange(n, device=hidden.device) + torch.repeat_interleave(plan[0], plan[1], output_size=n)
        source = torch.zeros(blocks[-1], dtype=torch.long, device=hidden.device)
        source[rows] = tok
        return hidden[source], rows

    def _operands(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged loop's right-hand matrices of the expert in `slot` (views of the pool, made once per slot)."""
        found = self._slot_operands.get(slot)
        if found is None:
            assert self.stages is not None
            found = self._slot_operands[slot] = self.stages.operands(self.layer.cache.weights(slot))
        return found
