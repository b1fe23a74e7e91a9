"""OffloadedMoELayer: one MoE layer's expert computation over the cache, in the field's canonical form.

Input is what every router gives: hidden states [T, H], top-k expert ids [T, k] and their gate weights [T, k]
(an id >= num_experts marks "no expert", e.g. a token dropped by Switch's capacity limit). The experts a batch
needs are made resident in waves no larger than the cache, in ascending expert order, so that the sum over
experts is accumulated in the same order as transformers' eager forward: the output is exact, whatever the
budget or the eviction rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import ExpertCache

ExpertFFN = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class OffloadedMoELayer:
    def __init__(self, layer_idx: int, num_experts: int, cache: ExpertCache, expert_ffn: ExpertFFN):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.cache = cache
        self.expert_ffn = expert_ffn

    def needed_experts(self, top_k_index: torch.Tensor) -> list[int]:
        """Distinct expert ids in the batch, ascending (one device->host sync: residency is a host decision)."""
        ids = torch.unique(top_k_index).tolist()
        return [e for e in ids if 0 <= e < self.num_experts]

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        needed = self.needed_experts(top_k_index)
        wave = self.cache.n_slots
        for start in range(0, len(needed), wave):
            experts = needed[start : start + wave]
            keys = [(self.layer_idx, e) for e in experts]
            slots = self.cache.acquire(keys)
            try:
                for expert, slot in zip(experts, slots):
                    pos, tok = torch.where((top_k_index == expert).T)
                    y = self.expert_ffn(hidden[tok], self.cache.weights(slot))
                    y = y * top_k_weights[tok, pos, None]
                    out.index_add_(0, tok, y.to(out.dtype))
            finally:
                self.cache.release(keys)
        return out
