"""The grouped paths that never ask the host which experts a call needs: the host runs ahead of the GPU.

Both route on the device (`kernels.route_tiles_on_device`: one launch builds the permutation and a table of tiles,
each a run of rows of one slot), permute, run the expert FFN over the tiles of the routed slots only, and
un-permute with the gate weights. They differ in where the slot of each expert comes from:
- `ResidentOnDevice`: every expert of the layer is resident for good (`ExpertCache.resident_table`), so the slots
  are a fixed table;
- `FetchedOnDevice` (fetch="device"): the cache's directory on the device looks the experts up, picks victims and
  has the misses filled (`ExpertCache.fetch_on_device`), all launched without a sync.
The routing's single launch takes at most `FUSED_ROUTE_MAX_PAIRS` (token, expert) pairs; a larger call (a
prefill) takes the host path, which computes its rows with the same kernel (`moeoffload.paths`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import kernels as _kernels
from ..kernels.routing import FUSED_ROUTE_MAX_PAIRS
from .common import drop_prefetcher, grouped_form

if TYPE_CHECKING:
    from ..layer import OffloadedMoELayer


def tiled_experts(layer: OffloadedMoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, slot_of_id: torch.Tensor, slot_ends: torch.Tensor,
                  landing: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [T, H], offs): the layer's experts over tiles routed on the device. With `landing` (a copy still in
    flight after the lookup), the tiles of slots whose copy has landed run first, then the compute stream waits
    for the copies (`ExpertCache.finish_fetch`), then the rest."""
    backend, tokens, k = layer.plan.backend, hidden.shape[0], top_k_index.shape[1]
    order, inverse, offs, tiles = _kernels.route_tiles_on_device(
        top_k_index, slot_of_id, slot_ends, _kernels.tile_rows(tokens), backend=backend,
        landing=None if landing is None else landing[0], flag=None if landing is None else landing[1])
    x = _kernels.permute(hidden, order, backend=backend, divisor=k)
    pool, spec = layer.cache.pool, grouped_form(layer)
    y = _kernels.grouped_ffn_by_tiles(spec, x, pool, tiles[:3], tokens, backend=backend)
    if landing is not None:
        layer.cache.finish_fetch()
        _kernels.grouped_ffn_by_tiles(spec, x, pool, tiles[3:], tokens, backend=backend, out=y)
    out = _kernels.unpermute(y, inverse, top_k_weights, hidden.dtype, backend=backend, token_major=True,
                             limit=offs[-1:])
    return out, offs


class ResidentOnDevice:
    def __init__(self, layer: OffloadedMoELayer):
        self.layer = layer
        self._route: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (table, slot_of_id, slot_ends)

    def serves(self, top_k_index: torch.Tensor) -> bool:
        """Every expert of the layer is resident for good, and the call fits the routing's one launch."""
        if top_k_index.numel() > FUSED_ROUTE_MAX_PAIRS:
            return False
        layer = self.layer
        return layer.cache.resident_table(layer.layer_idx, layer.num_experts) is not None

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        layer.cache.enter_layer(layer.layer_idx)
        table = layer.cache.resident_table(layer.layer_idx, layer.num_experts)
        assert table is not None
        if self._route is None or self._route[0] is not table:  # made again only when the table changes
            n_slots = layer.cache.n_slots
            ends = torch.arange(1, n_slots + 1, dtype=torch.int32, device=table.device)
            self._route = (table, _kernels.slot_lookup(table, n_slots), ends)
        out, offs = tiled_experts(layer, hidden, top_k_index, top_k_weights, self._route[1], self._route[2])
        layer.cache.count_hits(offs)  # counted on the device, folded in when statistics are read
        return out


class FetchedOnDevice:
    def __init__(self, layer: OffloadedMoELayer, split: bool = True):
        self.layer = layer
        self.split = split  # run the tiles of slots already resident before waiting for the copies
        self.last = layer.layer_idx == layer.cache.store.num_layers - 1

    def serves(self, top_k_index: torch.Tensor) -> bool:
        """No prefetcher or one that guesses on the device, no routing to replace, few enough pairs for one
        routing launch, and every expert the call may name fits in the pool at once."""
        layer, pairs = self.layer, top_k_index.numel()
        return (pairs <= FUSED_ROUTE_MAX_PAIRS and layer.router_tap is None
                and (layer.prefetcher is None or hasattr(layer.prefetcher, "predict_on_device"))
                and layer.cache.serves_on_device(min(layer.num_experts, pairs)))

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layer, cache = self.layer, self.layer.cache
        landing = cache.landing_view() if self.split else None
        row = cache.fetch_on_device(layer.layer_idx, top_k_index, self._ahead(hidden), wait=landing is None)
        assert cache.directory is not None
        out, _ = tiled_experts(layer, hidden, top_k_index, top_k_weights, row, cache.directory.slot_ends, landing)
        if self.last:
            cache.settle_device()  # the model's last MoE layer: what follows may block (`Courier.drain`)
        return out

    def _ahead(self, hidden: torch.Tensor):
        """A callable giving the prefetcher's (next layer, guessed ids on the device), or None without one. A
        guess that fails is dropped as on the host path: a warning, then on demand."""
        layer = self.layer
        prefetcher = layer.prefetcher
        if prefetcher is None:
            return None

        def guess():
            try:
                return prefetcher.predict_on_device(layer.layer_idx, hidden)
            except Exception as exc:
                drop_prefetcher(layer, exc, stacklevel=6)
                return None

        return guess
