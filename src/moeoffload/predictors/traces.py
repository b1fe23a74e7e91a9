"""Routing traces: what the model's routers chose, saved and loaded (`recording.py` records them from the engine).

Two kinds, for two uses:
- `RoutingTrace` (per token): for each forward call of a stack, the token ids and, per MoE layer, the router's
  logits, top-k ids and weights (and optionally the layer's input hidden states). Predictors train on it and are
  scored on a held-out one. Collected by teacher-forced full-sequence passes over prompt + generated tokens.
- `CallTrace` (per layer call): the experts each MoE layer call needed, in call order, for one exact sequence
  of generate() calls. The oracle prefetcher and Belady's eviction replay it; it is only valid for those inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEMA_VERSION = 1


@dataclass
class RoutingTrace:
    info: dict  # family, num_experts, top_k, num_layers, layer_stack (stack of each layer), normalize
    chunks: list[dict] = field(default_factory=list)
    # chunk: {"stack": s, "tokens": LongTensor [B, S], "layers": {layer: {"logits" [B*S, E] fp16, "ids" [B*S, k],
    #         "weights" [B*S, k], optional "hidden" [B*S, H] fp16}}}

    @property
    def num_layers(self) -> int:
        return self.info["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.info["num_experts"]

    @property
    def top_k(self) -> int:
        return self.info["top_k"]

    def tokens(self) -> int:
        return sum(c["tokens"].numel() for c in self.chunks if c["stack"] == 0)

    def split(self, held_out: float = 0.2) -> tuple[RoutingTrace, RoutingTrace]:
        """(train, held-out) by whole chunks (batches), so no sequence is in both."""
        n_held = max(1, round(len(self.chunks) * held_out)) if len(self.chunks) > 1 else 0
        cut = len(self.chunks) - n_held
        return RoutingTrace(self.info, self.chunks[:cut]), RoutingTrace(self.info, self.chunks[cut:])

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "routing-trace", "info": self.info, "chunks": self.chunks},
                   Path(path))

    @staticmethod
    def load(path: str | Path) -> RoutingTrace:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "routing-trace":
            raise ValueError(f"{path} is not a moeoffload routing trace; record one with collect_trace()")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: routing trace schema {data.get('schema')}, this moeoffload reads "
                             f"{SCHEMA_VERSION}; record it again")
        return RoutingTrace(data["info"], data["chunks"])


PAST_END = ("warn", "lru")


@dataclass
class CallTrace:
    calls: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (layer, experts needed), call order
    # What the oracle does with calls served after the last recorded one. "warn": they were not recorded, so the
    # served inputs are not the recorded ones. "lru": the recording deliberately covers only the calls whose
    # statistics count (e.g. moebench's timed rounds, not its untimed accuracy pass after them); the oracle then
    # steps aside quietly and the rest is served as LRU without prefetch. A call of another layer than recorded
    # warns either way.
    past_end: str = "warn"

    def __post_init__(self) -> None:
        if self.past_end not in PAST_END:
            raise ValueError(f"CallTrace past_end must be one of {PAST_END}, got {self.past_end!r}")

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "call-trace", "calls": self.calls, "past_end": self.past_end},
                   Path(path))

    @staticmethod
    def load(path: str | Path) -> CallTrace:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "call-trace" or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path} is not a moeoffload call trace of schema {SCHEMA_VERSION}; record it again")
        return CallTrace([(int(layer), tuple(experts)) for layer, experts in data["calls"]],
                         past_end=data.get("past_end", "warn"))
