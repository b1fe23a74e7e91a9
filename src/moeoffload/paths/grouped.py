"""GroupedOnHost: the grouped kernels after one device->host sync that says which experts a call needs.

Permute the rows by expert once, run the expert FFN over each wave's slots (one launch per projection), and
un-permute once with the gate weights. It serves every call the device paths cannot: a policy whose cache or
predictor works on the host, and calls too large for the device routing's single launch (a long prefill).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import kernels as _kernels
from .common import Route, expert_rows, host_route, waves

if TYPE_CHECKING:
    from ..layer import OffloadedMoELayer


class GroupedOnHost:
    def __init__(self, layer: OffloadedMoELayer):
        self.layer = layer

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 route: Route | None = None) -> torch.Tensor:
        """`route`: the call's token-major `host_route`, when the caller routed it already (HostAssisted)."""
        layer = self.layer
        layer.cache.enter_layer(layer.layer_idx)
        backend, tokens, k = layer.plan.backend, hidden.shape[0], top_k_index.shape[1]
        if route is None:
            route = host_route(top_k_index, layer.num_experts, token_major=True)
        needed, starts, order = route
        n_valid = starts[-1]
        x = _kernels.permute(hidden, order[:n_valid], backend=backend, divisor=k)
        y = torch.empty_like(x)
        for first, slots in waves(layer, needed, hidden):
            groups = [(starts[first + i], starts[first + i + 1], slot) for i, slot in enumerate(slots)]
            expert_rows(layer, x, groups, y, tokens)
        inverse = _kernels.inverse_order(order, n_valid)
        return _kernels.unpermute(y, inverse, top_k_weights, hidden.dtype, backend=backend, token_major=True)
