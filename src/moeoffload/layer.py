"""OffloadedMoELayer: one MoE layer's expert computation over the cache, in the field's canonical form.

Input is what every router gives: hidden states [T, H], top-k expert ids [T, k] and their gate weights [T, k]
(an id >= num_experts marks "no expert", e.g. a token dropped by Switch's capacity limit). The experts a batch
needs are made resident in waves no larger than the cache, in ascending expert order, so that the sum over
experts is accumulated in the same order as transformers' eager forward: the output is exact, whatever the
budget or the eviction rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .cache import ExpertCache

ExpertFFN = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Prefetcher = Callable[[int, torch.Tensor], None]  # (this layer's index, its MoE input) -> starts copies
# (layer index, MoE input [T, H], router's ids [T, k], router's weights [T, k]) -> None to keep the router's choice,
# or (ids, weights) to replace it. Traces and oracles only look (None); a data-aware policy replaces (approximate).
RouterTap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


class OffloadedMoELayer:
    def __init__(self, layer_idx: int, num_experts: int, cache: ExpertCache, expert_ffn: ExpertFFN,
                 prefetcher: Prefetcher | None = None, router_tap: RouterTap | None = None):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.cache = cache
        self.expert_ffn = expert_ffn
        self.prefetcher = prefetcher
        self.router_tap = router_tap

    def _prefetch(self, hidden: torch.Tensor) -> None:
        """Start the next layer's copies before this layer computes. A predictor is a guess, so a broken one
        (it raises, or names experts that do not exist) must not break inference: this layer drops it, warns
        once, and fetches on demand from then on; the output is unaffected either way."""
        try:
            self.prefetcher(self.layer_idx, hidden)
        except Exception as exc:
            warnings.warn(f"moeoffload: prefetcher of MoE layer {self.layer_idx} failed ({type(exc).__name__}: "
                          f"{exc}); this layer now fetches experts on demand", RuntimeWarning, stacklevel=3)
            self.prefetcher = None

    def _tap(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The router tap's routing, or the router's own. A replacement naming experts that do not exist (or of
        the wrong shape) is never used as routing: the tap is dropped with a warning and the router decides."""
        try:
            out = self.router_tap(self.layer_idx, hidden, top_k_index, top_k_weights)
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

    def route(self, top_k_index: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """Group the (token, k) pairs by expert with one device->host sync per layer.

        Returns the needed experts (ascending), the start of each expert's run in `order`, and `order`: flat
        positions `pos * T + token`, stably sorted by expert, so that within an expert pairs come by top-k
        position, then token: the order of transformers' eager loop (`torch.where` over [k, T]).
        """
        flat = top_k_index.T.reshape(-1)
        invalid = (flat < 0) | (flat >= self.num_experts)
        flat = torch.where(invalid, self.num_experts, flat)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        needed, starts, offset = [], [], 0
        for expert, count in enumerate(counts):
            if count:
                needed.append(expert)
                starts.append(offset)
            offset += count
        starts.append(offset)
        return needed, starts, order

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.router_tap is not None:
            top_k_index, top_k_weights = self._tap(hidden, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        tokens = hidden.shape[0]
        needed, starts, order = self.route(top_k_index)
        wave = self.cache.n_slots
        for first in range(0, len(needed), wave):
            experts = needed[first : first + wave]
            keys = [(self.layer_idx, e) for e in experts]
            slots = self.cache.acquire(keys)
            try:
                if self.prefetcher is not None and first == 0 and len(needed) <= wave:
                    self._prefetch(hidden)
                for i, slot in enumerate(slots):
                    pairs = order[starts[first + i] : starts[first + i + 1]]
                    tok, pos = pairs % tokens, pairs // tokens
                    y = self.expert_ffn(hidden[tok], self.cache.weights(slot))
                    y = y * top_k_weights[tok, pos, None]
                    out.index_add_(0, tok, y.to(out.dtype))
            finally:
                self.cache.release(keys)
        return out
