"""Scoring a predictor on a held-out routing trace, per MoE layer.

- precision / recall: per forward call, the set of experts predicted for the batch against the set its router
  used (what prefetching cares about: a wrong expert costs a copy, a missed one a stall), pooled over calls;
- hit_rate: per token, the fraction of its router's top-k experts that its predicted top-k contains;
- exact: the fraction of tokens whose predicted top-k set is exactly the router's (what data-aware routing needs).
"""

from __future__ import annotations

import torch

from .base import RoutingPredictor, StackInputs
from .traces import RoutingTrace


class RandomPredictor:
    """k distinct experts per token, uniformly at random: the floor a predictor must beat."""

    name = "random"

    def __init__(self, num_experts: int, top_k: int, seed: int = 0):
        self.num_experts, self.top_k = num_experts, top_k
        self.gen = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        pass

    def predict(self, inputs: StackInputs):
        from .base import Prediction

        n = inputs.input_ids.numel()
        scores = torch.rand(len(inputs.layers), n, self.num_experts, generator=self.gen)
        return Prediction(list(inputs.layers), scores.topk(self.top_k, dim=-1).indices)


def evaluate(predictor: RoutingPredictor, trace: RoutingTrace) -> dict[int, dict[str, float]]:
    """Per layer: precision, recall, hit_rate, exact (see module doc) and the number of tokens scored."""
    e = trace.num_experts
    acc: dict[int, dict[str, float]] = {}
    for chunk in trace.chunks:
        s = chunk["stack"]
        layers = [i for i, st in enumerate(trace.info["layer_stack"]) if st == s and i in chunk["layers"]]
        if not layers:
            continue
        predictor.reset()
        pred = predictor.predict(StackInputs(s, layers, chunk["tokens"], new_sequence=True))
        for i in layers:
            row = pred.row(i)
            if row is None:
                continue
            guess = pred.top_k_ids[row].cpu().long()  # [T, k']
            true = chunk["layers"][i]["ids"].long()  # [T, k]
            valid = (true >= 0) & (true < e)
            g_onehot = torch.zeros(guess.shape[0], e + 1, dtype=torch.bool).scatter_(1, guess.clamp(0, e), True)
            t_onehot = torch.zeros(true.shape[0], e + 1, dtype=torch.bool).scatter_(
                1, torch.where(valid, true, e), True)
            g_onehot, t_onehot = g_onehot[:, :e], t_onehot[:, :e]
            a = acc.setdefault(i, dict(tp=0, pred=0, true=0, tok_hits=0, tok_pairs=0, exact=0, tokens=0))
            g_set, t_set = g_onehot.any(0), t_onehot.any(0)
            a["tp"] += int((g_set & t_set).sum())
            a["pred"] += int(g_set.sum())
            a["true"] += int(t_set.sum())
            a["tok_hits"] += int((g_onehot & t_onehot).sum())
            a["tok_pairs"] += int(t_onehot.sum())
            a["exact"] += int((g_onehot == t_onehot).all(1).sum())
            a["tokens"] += true.shape[0]
    out = {}
    for i, a in sorted(acc.items()):
        out[i] = {"precision": a["tp"] / max(a["pred"], 1), "recall": a["tp"] / max(a["true"], 1),
                  "hit_rate": a["tok_hits"] / max(a["tok_pairs"], 1), "exact": a["exact"] / max(a["tokens"], 1),
                  "tokens": a["tokens"]}
    return out


def summary(per_layer: dict[int, dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of each metric over layers."""
    total = sum(m["tokens"] for m in per_layer.values()) or 1
    keys = ("precision", "recall", "hit_rate", "exact")
    return {k: sum(m[k] * m["tokens"] for m in per_layer.values()) / total for k in keys}
