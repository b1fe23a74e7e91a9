"""Frequency prior (MoE-Infinity's idea, as a static prior): how often each expert of each layer was activated
on a training trace. It predicts each layer's most frequent experts for every token, and ranks residents for the
`prior-frequency` eviction rule (the popular experts keep their slots)."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Prediction, StackInputs
from .traces import SCHEMA_VERSION, RoutingTrace


class FrequencyPrior:
    name = "frequency"

    def __init__(self, counts: torch.Tensor, top_k: int):
        self.counts = counts.float()  # [num_layers, num_experts]
        self.top_k = top_k
        self._rank = self.counts.argsort(dim=-1, descending=True)
        self._table = self.counts.tolist()  # the eviction rule asks once per insert: a list, not a tensor index

    @staticmethod
    def fit(trace: RoutingTrace) -> FrequencyPrior:
        counts = torch.zeros(trace.num_layers, trace.num_experts)
        for chunk in trace.chunks:
            for layer, rec in chunk["layers"].items():
                ids = rec["ids"].reshape(-1)
                ids = ids[(ids >= 0) & (ids < trace.num_experts)]
                counts[layer] += torch.bincount(ids, minlength=trace.num_experts).float()
        return FrequencyPrior(counts, trace.top_k)

    def frequency(self, key: tuple[int, int]) -> float:
        layer, expert = key
        return self._table[layer][expert]

    def reset(self) -> None:
        pass

    def predict(self, inputs: StackInputs) -> Prediction:
        tokens = inputs.input_ids.numel()
        ids = self._rank[inputs.layers, : self.top_k].to(inputs.input_ids.device)
        return Prediction(list(inputs.layers), ids[:, None, :].expand(-1, tokens, -1))

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "frequency", "counts": self.counts, "top_k": self.top_k},
                   Path(path))

    @staticmethod
    def load(path: str | Path) -> FrequencyPrior:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if data.get("kind") != "frequency" or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path} is not a moeoffload frequency prior of schema {SCHEMA_VERSION}")
        return FrequencyPrior(data["counts"], int(data["top_k"]))
