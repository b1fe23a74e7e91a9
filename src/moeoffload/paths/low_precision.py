"""DequantizingLoop: a layer's experts copied in low precision and computed from their quantized slots.

Per needed expert, in ascending expert order: the policy picks the least precision it may have (every copy low, or
HOBBIT's rule: full precision when the expert's largest gate weight in the call reaches the policy's threshold),
`PrecisionCaches` serves the most precise resident copy or copies the wanted one, and the rows are computed as the
plan's `dequant` says: "fused", the dequantizing Triton GEMM reads the quantized slot (`kernels.dequant_linear`);
"arrival", the slot is dequantized into the model's one full-precision scratch expert (`PrecisionCaches.scratch`)
and the plan's kernels (the exact loop's expert FFN, or the grouped kernels over a one-slot pool) read that.
Dequantize-on-arrival dequantizes on every use, hits included, since a slot keeps the quantized form.
One expert at a time, so the scratch is one expert and any slot count serves a call; the copies still queue back
to back on the transfer stream, and the compute stream orders each dequantization after the previous expert's FFN
that read the scratch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import kernels as _kernels
from ..cache import PrecisionCaches
from ..kernels.dequant_linear import quantized_ffn
from ..layout import QuantizedLayout
from .common import grouped_form, host_route

if TYPE_CHECKING:
    from ..layer import ExpertFFN, OffloadedMoELayer


class DequantizingLoop:
    def __init__(self, layer: OffloadedMoELayer, expert_ffn: ExpertFFN, caches: PrecisionCaches,
                 full_precision_gate: float | None):
        self.layer = layer
        self.expert_ffn = expert_ffn
        self.caches = caches
        self.gate = full_precision_gate
        self.low = caches.order[-1]
        self.layout = caches.caches[caches.order[0]].store.full_layout
        self.fused = layer.plan.dequant == "fused"
        self.scratch = caches.scratch(0 if self.fused else self.layout.numel, self.layout.dtype)
        self.scratch_views = {} if self.fused else self.layout.views(self.scratch)
        if self.fused:  # the two matrices the grouped kernels' form names, by their place in the layout
            spec = grouped_form(layer)
            offsets = dict(zip((sum(self.layout.numels[:i]) for i in range(len(self.layout.names))),
                               self.layout.names))
            self.up, self.down = offsets[spec.w1_offset], offsets[spec.w2_offset]

    def wanted(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, needed: list[int]) -> list[str]:
        """The least precision each needed expert may have (one more device->host sync for a mixed policy)."""
        if self.gate is None:
            return [self.low] * len(needed)
        num_experts = self.layer.num_experts
        ids = top_k_index.reshape(-1)
        valid = (ids >= 0) & (ids < num_experts)
        largest = torch.zeros(num_experts + 1, dtype=torch.float32, device=ids.device)
        largest.scatter_reduce_(0, torch.where(valid, ids, num_experts), top_k_weights.reshape(-1).float(), "amax")
        weights = largest[torch.tensor(needed, device=ids.device)].tolist()
        return ["full" if w >= self.gate else self.low for w in weights]

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        for cache in self.caches.caches.values():
            cache.enter_layer(layer.layer_idx)
        needed, starts, order = host_route(top_k_index, layer.num_experts)
        out = torch.zeros_like(hidden)
        tokens = hidden.shape[0]
        for i, (expert, wanted) in enumerate(zip(needed, self.wanted(top_k_index, top_k_weights, needed))):
            pairs = order[starts[i] : starts[i + 1]]
            tok, pos = pairs % tokens, pairs // tokens
            key = (layer.layer_idx, expert)
            precision, slot = self.caches.acquire(key, wanted)
            try:
                y = self._rows(hidden[tok], precision, slot, tokens)
            finally:
                self.caches.release(key, precision)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def _rows(self, x: torch.Tensor, precision: str, slot: int, tokens: int) -> torch.Tensor:
        """The expert's FFN over rows x, its weights in `slot` of `precision`'s cache."""
        cache = self.caches.caches[precision]
        if precision != "full" and self.fused:
            return self._fused_rows(x, cache.weights(slot), self._quantized_layout(cache))
        if precision == "full":
            pool, row, weights = cache.pool, slot, cache.weights(slot)
        else:
            self._quantized_layout(cache).dequantize(cache.weights(slot), self.scratch_views)
            pool, row, weights = self.scratch.view(1, -1), 0, self.scratch_views
        if not self.layer.plan.grouped:
            return self.expert_ffn(x, weights)
        y = torch.empty_like(x)
        _kernels.grouped_ffn(grouped_form(self.layer), x, pool, [(0, x.shape[0], row)], y, max_rows=max(tokens, 1),
                             backend=self.layer.plan.backend)
        return y

    @staticmethod
    def _quantized_layout(cache) -> QuantizedLayout:
        layout = cache.store.layout
        assert isinstance(layout, QuantizedLayout)
        return layout

    def _fused_rows(self, x: torch.Tensor, q: dict[str, torch.Tensor], layout: QuantizedLayout) -> torch.Tensor:
        """The FFN read straight from the quantized slot by the dequantizing GEMM (`kernels.dequant_linear`)."""
        spec = grouped_form(self.layer)
        parts = [(q[n], q[n + ".scale"], q[n + ".zero"]) for n in (self.up, self.down)]
        return quantized_ffn(spec.kind, spec.intermediate, x, parts[0], parts[1], layout.bits,
                             (layout.groups[self.up], layout.groups[self.down]), fused=True)
