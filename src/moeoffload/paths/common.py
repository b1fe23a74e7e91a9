"""What the execution paths share: host routing, the cache's waves, the prefetch guard, the grouped FFN call."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .. import kernels as _kernels

if TYPE_CHECKING:
    from ..layer import OffloadedMoELayer


Route = tuple[list[int], list[int], torch.Tensor]  # (needed experts, start of each one's run, pair order)


def host_route(top_k_index: torch.Tensor, num_experts: int, token_major: bool = False) -> Route:
    """Group the (token, k) pairs by expert with one device->host sync.

    Returns the needed experts (ascending), the start of each expert's run in `order` (one more entry: the end),
    and `order`: flat pair positions stably sorted by expert. Positions are `pos * T + token` by default, so that
    within an expert pairs come by top-k position, then token: the order of transformers' eager loop
    (`torch.where` over [k, T]); `token_major`: `token * k + pos`, the order the device routing gives, so that a
    grouped kernel sees an expert's rows in the same order whichever path routed them."""
    flat = top_k_index.reshape(-1) if token_major else top_k_index.T.reshape(-1)
    flat = torch.where((flat < 0) | (flat >= num_experts), num_experts, flat)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    needed, starts, offset = [], [], 0
    for expert, count in enumerate(counts):
        if count:
            needed.append(expert)
            starts.append(offset)
        offset += count
    starts.append(offset)
    return needed, starts, order


def sub_route(route: Route, experts: set[int]) -> Route:
    """The route of the needed experts in `experts` only, from `route`: their runs as they were, then every other
    pair (positions past the last start), so the order is still a permutation of every pair position."""
    needed, starts, order = route
    chosen = [i for i, e in enumerate(needed) if e in experts]
    if len(chosen) == len(needed):
        return route
    others = [i for i, e in enumerate(needed) if e not in experts]
    runs = [order[starts[i] : starts[i + 1]] for i in chosen + others] + [order[starts[-1] :]]
    sub_starts = [0]
    for i in chosen:
        sub_starts.append(sub_starts[-1] + starts[i + 1] - starts[i])
    return [needed[i] for i in chosen], sub_starts, torch.cat(runs)


@contextmanager
def pinned_wave(layer: OffloadedMoELayer, experts: list[int], prefetch: torch.Tensor | None) -> Iterator[list[int]]:
    """The slots of `experts` (made resident and pinned) while the block runs; they are released after it.
    `prefetch`: the layer's input, when the next layer's copies should start before this wave computes."""
    keys = [(layer.layer_idx, e) for e in experts]
    slots = layer.cache.acquire(keys)
    try:
        if prefetch is not None:
            layer.prefetch(prefetch)
        yield slots
    finally:
        layer.cache.release(keys)


def waves(layer: OffloadedMoELayer, needed: list[int], hidden: torch.Tensor) -> Iterator[tuple[int, list[int]]]:
    """(index of the wave's first expert in `needed`, its slots) for waves no larger than the cache, in ascending
    expert order. The prefetch starts with the first wave, and only when one wave holds every needed expert (a
    copy for the next layer must not evict what a later wave of this one needs)."""
    wave = layer.cache.n_slots
    for first in range(0, len(needed), wave):
        ahead = hidden if layer.prefetcher is not None and first == 0 and len(needed) <= wave else None
        with pinned_wave(layer, needed[first : first + wave], ahead) as slots:
            yield first, slots


def grouped_form(layer: OffloadedMoELayer) -> _kernels.FFNSpec:
    """The layer's expert form as the grouped kernels read it (the plan has checked that there is one)."""
    if layer.spec is None:
        raise ValueError(f"MoE layer {layer.layer_idx}: the grouped kernels do not compute this expert form")
    return layer.spec


def expert_rows(layer: OffloadedMoELayer, x: torch.Tensor, groups: list[tuple[int, int, int]], out: torch.Tensor,
                tokens: int) -> None:
    """out[first:end] = FFN of the expert in `slot` over x[first:end], for each (first, end, slot) group. The tile
    size comes from the call's token count (no expert has more rows than tokens), so the device paths, which know
    only that count, compute every row with the same kernel configuration."""
    _kernels.grouped_ffn(grouped_form(layer), x, layer.cache.pool, groups, out, max_rows=max(tokens, 1),
                         backend=layer.plan.backend)


def drop_prefetcher(layer: OffloadedMoELayer, exc: Exception, stacklevel: int) -> None:
    """A prefetcher is a guess, so a broken one must not break inference: warn once, fetch on demand from then on."""
    warnings.warn(f"moeoffload: prefetcher of MoE layer {layer.layer_idx} failed ({type(exc).__name__}: {exc}); this "
                  "layer now fetches experts on demand", RuntimeWarning, stacklevel=stacklevel)
    layer.prefetcher = None
