"""HostAssisted: a layer call whose missed experts are copied into the cache or computed on the host CPU.

One device->host sync routes the call (as the plan's host path does); the plan's `misses` rule
(`moeoffload.costmodel.on_host`) says which misses the host computes. Their rows, gate weights and token indices
go to the host in one copy, the host's worker computes them (`moeoffload.hostexperts`) while this thread runs the
plan's host path over the rest (the resident experts and the misses to copy), and the two outputs are added.
Not bit-identical to the device: the host sums in another order (policies with host misses are approximate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..costmodel import on_host
from ..hostexperts import HostComputeError, HostExperts
from .common import Route, host_route, sub_route

if TYPE_CHECKING:
    from ..layer import ExpertFFN, OffloadedMoELayer
    from .exact import ExactLoop
    from .grouped import GroupedOnHost

SCORE_DECAY = 0.9  # per call of the layer: an expert's score is its recent routed rows, older calls fading


class HostAssisted:
    def __init__(self, layer: OffloadedMoELayer, inner: ExactLoop | GroupedOnHost, expert_ffn: ExpertFFN,
                 host: HostExperts):
        self.layer = layer
        self.inner = inner
        self.expert_ffn = expert_ffn
        self.host = host
        self.token_major = layer.plan.grouped  # the route's pair order, as the inner path reads it
        self.scores: dict[int, float] = {}  # expert -> decayed routed rows ("split" copies the highest first)

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        route = host_route(top_k_index, layer.num_experts, token_major=self.token_major)
        needed, starts, _ = route
        rows = {e: starts[i + 1] - starts[i] for i, e in enumerate(needed)}
        self._score(rows)
        resident = layer.cache.resident()
        missed = {e: n for e, n in rows.items() if (layer.layer_idx, e) not in resident}
        host_set = on_host(layer.plan.misses, self.host.measurements, missed, self.scores)
        if not host_set:
            return self.inner(hidden, top_k_index, top_k_weights, route=route)
        job = self._submit(hidden, top_k_index, top_k_weights, sub_route(route, host_set))
        device_route = sub_route(route, set(needed) - host_set)
        try:
            out = (self.inner(hidden, top_k_index, top_k_weights, route=device_route) if device_route[0]
                   else torch.zeros_like(hidden))
        except BaseException:
            job.exception()  # the worker finishes with the host buffers before the error leaves this call
            raise
        try:
            host_out = job.result()
        except Exception as exc:
            raise HostComputeError(
                f"moeoffload: MoE layer {layer.layer_idx}: computing experts {sorted(host_set)} on the host failed "
                f"({type(exc).__name__}: {exc}); this call fails, the next call runs as usual") from exc
        return out + host_out.to(device=hidden.device, dtype=hidden.dtype, non_blocking=True)

    def _score(self, rows: dict[int, int]) -> None:
        for e in list(self.scores):
            self.scores[e] *= SCORE_DECAY
        for e, n in rows.items():
            self.scores[e] = self.scores.get(e, 0.0) + n

    def _submit(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, route: Route):
        """Start the host's share: its pairs' rows, gate weights and tokens cross to the host in one copy."""
        experts, starts, order = route
        tokens, k = top_k_index.shape
        pairs = order[: starts[-1]]
        tok, pos = (pairs // k, pairs % k) if self.token_major else (pairs % tokens, pairs // tokens)
        packed = torch.cat([hidden[tok].float(), top_k_weights[tok, pos, None].float(), tok[:, None].float()], 1)
        packed = packed.cpu()  # [pairs, H + 2]; token indices are exact in fp32 below 2**24
        x, gate, tok_host = packed[:, :-2], packed[:, -2], packed[:, -1].long()
        counts = [starts[i + 1] - starts[i] for i in range(len(experts))]
        return self.host.submit(self.layer.layer_idx, experts, counts, x, gate, tok_host, tokens, self.expert_ffn)
