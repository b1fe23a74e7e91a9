"""The exact loop checked against a family's own eager experts forward before any weight moves.

The loop (`layer.OffloadedMoELayer`) computes each expert with the family's own ops (the hook's `expert_ffn`), then
weighs its rows by their gate weights and adds them into the tokens' sums, expert by expert in ascending order. The
experts forwards of transformers 5 mostly end the same way, but not all: Inkling2 sums a token's top-k in float32
and casts once at the end (its router hands on float32 gate weights), OpenAI's privacy filter computes every expert
in float32, Ergo's projections ignore the gate weights. Flags on the module (`use_experts_implementation`'s) do not
say which, so `sum_dtype` runs the eager forward and the loop's formula on a few random tokens, with gate weights in
float32 and in the experts' dtype, and keeps the dtype of the sum that reproduces eager bit for bit: the experts'
dtype, else float32. A forward that neither reproduces is refused by name, never served inexactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import integer

PROBE_TOKENS = 4  # enough rows that a float32 and a bf16 sum of two contributions disagree somewhere


def eager_forward(module: nn.Module) -> Callable:
    """The forward that `use_experts_implementation` wrapped (the family's eager loop), from the class or a base."""
    for cls in type(module).__mro__:
        wrapped = getattr(cls.__dict__.get("forward"), "__wrapped__", None)
        if wrapped is not None:
            return wrapped
    raise UnsupportedModelError(f"{type(module).__name__} has no eager experts forward (use_experts_implementation)")


def probe_routing(num_experts: int, top_k: int, device) -> torch.Tensor:
    """[PROBE_TOKENS, k] distinct experts per token over the first k + PROBE_TOKENS - 1 experts: every token has
    k contributions to sum, and few experts are read (a full-size expert is hundreds of MiB)."""
    t = torch.arange(PROBE_TOKENS, device=device)[:, None]
    return (t + torch.arange(top_k, device=device)[None, :]) % num_experts


def expert_rows(module: nn.Module, ffn: Callable, names: tuple[str, ...], hidden: torch.Tensor,
                index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens, top-k positions, the expert's output rows) per routed expert, ascending, in eager's row order."""
    rows = []
    for expert in index.unique().tolist():
        pos, tok = torch.where(index.T == expert)
        rows.append((tok, pos, ffn(hidden[tok], {n: getattr(module, n)[expert] for n in names})))
    return rows


def loop_sum(rows, weights: torch.Tensor, like: torch.Tensor, sum_dtype: torch.dtype) -> torch.Tensor:
    """What the exact loop returns (layer.OffloadedMoELayer.__call__) when it sums in `sum_dtype`."""
    out = torch.zeros_like(like, dtype=sum_dtype)
    for tok, pos, y in rows:
        out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
    return out.to(like.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN (uninitialised weights may hold any value)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def sum_dtype(module: nn.Module, ffn: Callable, names: tuple[str, ...], top_k: int,
              hidden_size: int) -> torch.dtype | None:
    """The dtype the exact loop must sum a token's contributions in to equal `module`'s eager forward (None: the
    hidden states' own); raises UnsupportedModelError where no sum does. None without a check for weights that
    cannot run (the meta device)."""
    weight = getattr(module, names[0])
    if weight.is_meta:
        return None
    dtype, device = weight.dtype, weight.device
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(PROBE_TOKENS, hidden_size, generator=g, device=device).to(dtype)
    num_experts = integer(module, "num_experts")
    index = probe_routing(num_experts, min(top_k, num_experts), device)
    gates = torch.rand(index.shape, generator=g, device=device)
    candidates = list(dict.fromkeys((dtype, torch.float32)))
    forward = eager_forward(module)
    with torch.no_grad():
        rows = expert_rows(module, ffn, names, hidden, index)
        works = {c: True for c in candidates}
        for w in (gates, gates.to(dtype)):
            try:
                eager = forward(module, hidden, index, w)
            except Exception as exc:
                raise _refusal(module, f"its eager forward fails on {top_k} experts per token "
                                       f"({type(exc).__name__}: {exc})") from exc
            for c in candidates:
                works[c] = works[c] and _same(loop_sum(rows, w, hidden, c), eager)
    for c in candidates:
        if works[c]:
            return None if c == dtype else c
    raise _refusal(module, "its eager experts forward computes what the exact loop does not (checked on random "
                           "tokens before offloading, gate weights in float32 and in the experts' dtype, the sum in "
                           "either dtype)")


def _refusal(module: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(module).__name__} ({type(module).__module__}): {what}; moeoffload cannot serve this family "
        "exactly. Serve it unoffloaded, or add its expert form to moeoffload.hooks (an experts forward that computes "
        "in float32 may match in a float32 model: model.to(torch.float32))"
    )
