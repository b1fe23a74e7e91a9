"""Predictors guess which experts a layer will need before its router says so, and feed the prefetcher.

A prediction only decides what is copied early; the router still decides what is computed, so a policy built on
a predictor stays exact: a wrong guess costs bandwidth and a slot, never accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cache import ExpertCache


class LookaheadGate:
    """Layer L+1's router applied to layer L's MoE input (Pre-gated MoE; mixtral-offloading's speculative
    loading). The residual stream changes little from one layer to the next, so this guess is often right; its
    copies start while layer L computes."""

    name = "lookahead"

    def __init__(self, cache: ExpertCache, router_weight: Callable[[int], torch.Tensor], num_layers: int,
                 top_k: int):
        self.cache = cache
        self.router_weight = router_weight
        self.num_layers = num_layers
        self.top_k = top_k

    def predict(self, layer_idx: int, hidden: torch.Tensor) -> list[int]:
        weight = self.router_weight(layer_idx + 1)
        logits = F.linear(hidden.to(weight.dtype), weight)
        return torch.unique(logits.topk(self.top_k, dim=-1).indices).tolist()

    def __call__(self, layer_idx: int, hidden: torch.Tensor) -> None:
        if layer_idx + 1 >= self.num_layers:
            return
        with torch.no_grad():
            experts = self.predict(layer_idx, hidden)
        self.cache.prefetch([(layer_idx + 1, e) for e in experts])


PREFETCHERS = {"lookahead": LookaheadGate}
