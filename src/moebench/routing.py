"""Routing structure of an MoE language model: how evenly it uses its experts and how often it reuses them.

Two figures per MoE layer, from the router logits of a teacher-forced pass over text:
- usage entropy: entropy of the share of top-k assignments each expert gets, divided by log(num_experts);
  1.0 is perfectly even use, lower means some experts are favoured.
- top-k reuse: the mean of |top-k(t) & top-k(t-1)| / k over consecutive tokens of a sequence; independent
  uniform routing gives k / num_experts. Reuse above that is what an expert cache can exploit.
"""

from __future__ import annotations

import math

import torch


def usage_entropy(top_k_index: torch.Tensor, num_experts: int) -> float:
    """Normalized entropy (0..1) of expert usage counted over every top-k slot of `top_k_index` [..., k]."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(num_experts)) if num_experts > 1 else 1.0


def topk_reuse(top_k_index: torch.Tensor, num_experts: int) -> float:
    """Mean share of a token's top-k experts that the previous token of the same sequence also used.

    `top_k_index` is [batch, seq, k]; needs seq >= 2.
    """
    if top_k_index.dim() != 3 or top_k_index.shape[1] < 2:
        raise ValueError(f"top_k_index must be [batch, seq >= 2, k], got {tuple(top_k_index.shape)}")
    k = top_k_index.shape[-1]
    onehot = torch.zeros(*top_k_index.shape[:2], num_experts, dtype=torch.int32, device=top_k_index.device)
    onehot.scatter_(-1, top_k_index, 1)
    shared = (onehot[:, 1:] * onehot[:, :-1]).sum(-1).double()
    return float(shared.mean() / k)


@torch.no_grad()
def routing_structure(model, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """Per-layer usage entropy and top-k reuse of a causal MoE LM (one that returns `router_logits`) on `ids`.

    `ids` is [n, seq]; it is run in batches of `batch_size` sequences on the model's device.
    """
    cfg = model.config
    k = cfg.num_experts_per_tok
    n_exp = cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start:start + batch_size].to(device)
        out = model(input_ids=chunk, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(k, dim=-1).indices.reshape(chunk.shape[0], chunk.shape[1], k).cpu()
            if layer == len(per_layer):
                per_layer.append([])
            per_layer[layer].append(top)
    layers = []
    for tops in per_layer:
        top = torch.cat(tops)
        layers.append({"usage_entropy": usage_entropy(top, n_exp), "topk_reuse": topk_reuse(top, n_exp)})
    return {
        "num_experts": n_exp,
        "top_k": k,
        "tokens": int(ids.numel()),
        "uniform_reuse": k / n_exp,
        "layers": layers,
        "mean_usage_entropy": sum(x["usage_entropy"] for x in layers) / len(layers),
        "mean_topk_reuse": sum(x["topk_reuse"] for x in layers) / len(layers),
    }
