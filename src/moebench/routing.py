"""Routing statistics of an MoE model: how unevenly it loads its experts, how often consecutive tokens reuse them,
how well one layer's choice predicts the next layer's, and how many experts a decode step at batch B touches.

These are the properties an expert cache or a predictor lives on, and the ones published routing analyses report
(docs/routing.md). Every figure comes with what independent uniform routing would give, so a reader sees at once
whether a model has structure to exploit:
- load: normalised entropy of the share of top-k slots each expert gets (1.0 = even) and max/mean load;
- first repeat: P(first choice of token t == first choice of t-1), as the Mixtral paper's Table 5 ("first choice");
  uniform: 1/E;
- top-k overlap: P(top-k(t) and top-k(t-1) share an expert) (Mixtral's "first or second choice");
  uniform: 1 - C(E-k, k) / C(E, k);
- top-k reuse: mean |top-k(t) & top-k(t-1)| / k; uniform: k/E;
- next-layer hit: predict layer l+1's top-k as the k experts most often seen there after layer l's first choice
  (fitted on half the sequences, scored on the other half); the marginal hit is the same with the k most used
  experts of l+1 regardless of layer l, so the difference is what layer l tells;
- working set: distinct experts per layer in one decode step of B sequences; uniform: E (1 - (1 - k/E)^B).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def usage_entropy(top_k_index: torch.Tensor, num_experts: int) -> float:
    """Normalized entropy (0..1) of expert usage counted over every top-k slot of `top_k_index` [..., k]."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(num_experts)) if num_experts > 1 else 1.0


def max_mean_load(top_k_index: torch.Tensor, num_experts: int) -> float:
    """Load of the busiest expert over the mean load (1.0 = even)."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).double()
    return float(counts.max() / counts.mean())


def _check_seq(top_k_index: torch.Tensor) -> None:
    if top_k_index.dim() != 3 or top_k_index.shape[1] < 2:
        raise ValueError(f"top_k_index must be [batch, seq >= 2, k], got {tuple(top_k_index.shape)}")


def _onehot(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(*top_k_index.shape[:-1], num_experts, dtype=torch.int32)
    return out.scatter_(-1, top_k_index.long(), 1)


def topk_reuse(top_k_index: torch.Tensor, num_experts: int) -> float:
    """Mean share of a token's top-k experts that the previous token of the same sequence also used.

    `top_k_index` is [batch, seq, k]; needs seq >= 2.
    """
    _check_seq(top_k_index)
    onehot = _onehot(top_k_index, num_experts)
    shared = (onehot[:, 1:] * onehot[:, :-1]).sum(-1).double()
    return float(shared.mean() / top_k_index.shape[-1])


def topk_overlap(top_k_index: torch.Tensor, num_experts: int) -> float:
    """P(a token's top-k and the previous token's top-k share at least one expert); [batch, seq, k]."""
    _check_seq(top_k_index)
    onehot = _onehot(top_k_index, num_experts)
    return float(((onehot[:, 1:] * onehot[:, :-1]).sum(-1) > 0).double().mean())


def first_repeat(top_k_index: torch.Tensor) -> float:
    """P(first choice of token t equals first choice of token t-1); [batch, seq, k] sorted by router score."""
    _check_seq(top_k_index)
    first = top_k_index[..., 0]
    return float((first[:, 1:] == first[:, :-1]).double().mean())


def working_set(top_k_index: torch.Tensor, num_experts: int, batch: int) -> float:
    """Mean distinct experts one decode step of `batch` sequences needs: sequences are grouped `batch` at a time
    and each position of a group is one step. [n, seq, k] with n >= batch."""
    n = top_k_index.shape[0] // batch * batch
    if n == 0:
        raise ValueError(f"working set at batch {batch} needs at least {batch} sequences, got {top_k_index.shape[0]}")
    onehot = _onehot(top_k_index[:n], num_experts)  # [n, seq, E]
    steps = onehot.reshape(n // batch, batch, *onehot.shape[1:]).amax(1)  # [groups, seq, E]
    return float(steps.sum(-1).double().mean())


def next_layer_hit(here: torch.Tensor, there: torch.Tensor, num_experts: int) -> tuple[float, float]:
    """(conditional, marginal) hit rate of predicting `there`'s top-k from `here`'s first choice.

    Both [n, seq, k]; the table P(expert at l+1 | first choice at l) and the marginal are counted on the even
    sequences and scored on the odd ones (all of them when there is one sequence)."""
    k = there.shape[-1]
    fit = slice(0, None, 2) if here.shape[0] > 1 else slice(None)
    score = slice(1, None, 2) if here.shape[0] > 1 else slice(None)
    first = here[fit][..., 0].reshape(-1).long()
    target = _onehot(there[fit], num_experts).reshape(-1, num_experts).double()
    table = torch.zeros(num_experts, num_experts, dtype=torch.float64).index_add_(0, first, target)
    marginal = target.sum(0)
    table += 1e-9 * marginal  # a first choice never seen in the fitted half falls back to the marginal order
    predicted = table.topk(k, dim=-1).indices  # [E, k]
    actual = _onehot(there[score], num_experts).reshape(-1, num_experts)
    pred = predicted[here[score][..., 0].reshape(-1).long()]  # [m, k]
    cond = actual.gather(1, pred).sum(-1).double().mean() / k
    marg = actual[:, marginal.topk(k).indices].sum(-1).double().mean() / k
    return float(cond), float(marg)


def uniform_figures(num_experts: int, top_k: int, batch: int) -> dict:
    """What independent uniform top-k routing gives for each figure."""
    e, k = num_experts, top_k
    no_overlap = math.comb(e - k, k) / math.comb(e, k) if e >= 2 * k else 0.0
    return {"usage_entropy": 1.0, "max_mean": 1.0, "first_repeat": 1 / e, "topk_overlap": 1 - no_overlap,
            "topk_reuse": k / e, "next_hit": k / e, "working_set": e * (1 - (1 - k / e) ** batch)}


@dataclass(frozen=True)
class LayerRouting:
    """The routing figures of one MoE layer (see the module docstring)."""

    layer: int
    stack: int
    depth: float  # position in its stack, 0 (first MoE layer) .. 1 (last)
    usage_entropy: float
    max_mean: float
    first_repeat: float
    topk_overlap: float
    topk_reuse: float
    next_hit: float | None  # None for the last MoE layer of a stack
    next_marginal: float | None
    working_set: float


def block_depth(model, name: str) -> float:
    """Where the module or parameter `name` sits in its stack of blocks: 0 the first block, 1 the last. Published
    figures are given by layer ("layer 15 of 32"), so depth counts blocks, MoE or dense."""
    parts = name.split(".")
    i = next(j for j, part in enumerate(parts) if part.isdigit())
    return int(parts[i]) / max(len(model.get_submodule(".".join(parts[:i]))) - 1, 1)


def layer_figures(tops: dict[int, torch.Tensor], stacks: list[int], num_experts: int, batch: int,
                  next_layer: list[int | None], depths: list[float] | None = None) -> list[LayerRouting]:
    """Per-layer figures from each layer's top-k ids [n, seq, k] (sorted by router score); `depths` default to the
    MoE layer's place among its stack's MoE layers."""
    out = []
    for i, top in sorted(tops.items()):
        same = [j for j in sorted(tops) if stacks[j] == stacks[i]]
        nxt = next_layer[i] if i < len(next_layer) else None
        hit = next_layer_hit(top, tops[nxt], num_experts) if nxt is not None and nxt in tops else (None, None)
        out.append(LayerRouting(
            layer=i, stack=stacks[i], depth=depths[i] if depths else same.index(i) / max(len(same) - 1, 1),
            usage_entropy=usage_entropy(top, num_experts), max_mean=max_mean_load(top, num_experts),
            first_repeat=first_repeat(top), topk_overlap=topk_overlap(top, num_experts),
            topk_reuse=topk_reuse(top, num_experts), next_hit=hit[0], next_marginal=hit[1],
            working_set=working_set(top, num_experts, min(batch, top.shape[0]))))
    return out


def trace_tops(trace) -> dict[int, torch.Tensor]:
    """Each layer's top-k ids [n, seq, k] from a moeoffload RoutingTrace, sorted by router weight (first = top)."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for chunk in trace.chunks:
        b, s = chunk["tokens"].shape
        for layer, rec in chunk["layers"].items():
            order = rec["weights"].argsort(dim=-1, descending=True, stable=True)
            ids = rec["ids"].gather(-1, order).reshape(b, s, -1)
            per_layer.setdefault(layer, []).append(ids)
    lengths = {t.shape[1] for ts in per_layer.values() for t in ts}
    if len(lengths) > 1:  # chunks of different lengths: keep the common prefix so sequences stack
        cut = min(lengths)
        per_layer = {k: [t[:, :cut] for t in ts] for k, ts in per_layer.items()}
    return {layer: torch.cat(ts) for layer, ts in per_layer.items()}


def routing_statistics(model, prompts: list[torch.Tensor], *, new_tokens: int = 1, batch: int = 8,
                       show_progress: bool | None = None, decoder_reads: str = "prompt") -> dict:
    """The routing figures of `model` on `prompts` (a list of [b, seq] id batches): one teacher-forced pass over
    each batch plus `new_tokens` greedy tokens. An encoder-decoder's decoder reads the prompt too (teacher-forced,
    shifted right), as published statistics are measured on a corpus; `decoder_reads="generated"` measures it on
    `new_tokens` greedy tokens instead. Returns {"num_experts", "top_k", "tokens", "uniform", "layers"}."""
    from moeoffload.predictors.recording import collect_trace

    trace = collect_trace(model, prompts, new_tokens=new_tokens, show_progress=show_progress,
                          decoder_reads=decoder_reads)
    tops = trace_tops(trace)
    if not tops:
        raise ValueError("no MoE layer routed a token; give longer prompts")
    e, k = trace.num_experts, trace.top_k
    from moeoffload.hooks import discover

    hook = discover(model)
    names = {id(m): n for n, m in model.named_modules()}
    depths = [block_depth(model, names[id(m)]) for m in hook.layers]
    layers = layer_figures(tops, trace.info["layer_stack"], e, batch, list(hook.next_layer), depths)
    return {"num_experts": e, "top_k": k, "batch": batch, "tokens": sum(t[..., 0].numel() for t in tops.values())
            // len(tops), "uniform": uniform_figures(e, k, batch), "layers": [asdict(x) for x in layers]}


def routing_structure(model, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """Per-layer usage entropy and top-k reuse on `ids` [n, seq] (the summary the trainer script prints)."""
    stats = routing_statistics(model, list(ids.split(batch_size)), new_tokens=1, batch=batch_size,
                               show_progress=False)
    layers = [{"usage_entropy": x["usage_entropy"], "topk_reuse": x["topk_reuse"]} for x in stats["layers"]]
    return {"num_experts": stats["num_experts"], "top_k": stats["top_k"], "tokens": int(ids.numel()),
            "uniform_reuse": stats["top_k"] / stats["num_experts"], "layers": layers,
            "mean_usage_entropy": sum(x["usage_entropy"] for x in layers) / len(layers),
            "mean_topk_reuse": sum(x["topk_reuse"] for x in layers) / len(layers)}
