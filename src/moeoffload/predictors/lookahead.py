"""Lookahead gate: the next layer's router run on this layer's input (Pre-gated MoE, mixtral-offloading)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cache import ExpertCache


class LookaheadGate:
    """Layer L+1's router applied to layer L's MoE input (Pre-gated MoE; mixtral-offloading's speculative
    loading). The residual stream changes little from one layer to the next, so this guess is often right; its
    copies start while layer L computes."""

    name = "lookahead"

    def __init__(self, cache: ExpertCache, router_weight: Callable[[int], torch.Tensor],
                 next_layer: list[int | None], top_k: int,
                 router_bias: Callable[[int], torch.Tensor | None] | None = None):
        self.cache = cache
        self.router_weight = router_weight
        self.router_bias = router_bias  # GPT-OSS's and Switch's routers may add one
        self.next_layer = next_layer
        self.top_k = top_k

    def predict(self, next_idx: int, hidden: torch.Tensor) -> list[int]:
        """Experts that layer `next_idx`'s router picks for `hidden`, the input of the layer before it."""
        return torch.unique(self._guess(next_idx, hidden)).tolist()

    def _guess(self, next_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.router_weight(next_idx)
        bias = self.router_bias(next_idx) if self.router_bias is not None else None
        logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return logits.topk(self.top_k, dim=-1).indices

    def predict_on_device(self, layer_idx: int, hidden: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(next layer, its guessed ids [T, k], still on the device) or None after the last layer: what
        fetch="device" queues as a prefetch without the host learning which experts they are."""
        next_idx = self.next_layer[layer_idx]
        if next_idx is None:
            return None
        with torch.no_grad():
            return next_idx, self._guess(next_idx, hidden)

    def __call__(self, layer_idx: int, hidden: torch.Tensor) -> None:
        next_idx = self.next_layer[layer_idx]
        if next_idx is None:
            return
        with torch.no_grad():
            experts = self.predict(next_idx, hidden)
        self.cache.prefetch([(next_idx, e) for e in experts])

