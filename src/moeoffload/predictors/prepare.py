"""Getting a policy what it needs before it serves: a trained predictor or a trace of the exact inputs.

A benchmark (moebench) calls `prepare(policy, model, ...)` before timing: policies declare their needs
(`Policy.predictor` -> `PREDICTORS[name].needs`) and the user does nothing by hand.
- "training-trace": routing is recorded on `train_prompts` (a workload distinct from the measured one) and
  the predictor is fitted on it;
- "exact-trace": `run()` (the exact untimed replay of what will be measured) is recorded call by call.
"""

from __future__ import annotations

from collections.abc import Callable

from .recording import collect_trace, record_calls, recording_handle
from .registry import PREDICTORS


def needs(policy) -> str | None:
    from .. import policies

    policy = policies.get(policy)
    if policy.predictor is None:
        return None
    return PREDICTORS[policy.predictor].needs


def prepare(policy, model, *, train_prompts=None, new_tokens: int = 8, run: Callable[[], object] | None = None,
            budget: str | int = "all", device=None, show_progress: bool | None = None, past_end: str = "warn",
            **options):
    """The `predictor=` argument `offload(model, policy, ...)` needs, or None when the policy needs none.
    `past_end` (exact-trace only): what the oracle does with calls served after those `run` made (CallTrace)."""
    from .. import policies
    policy = policies.get(policy)
    if policy.predictor is None:
        return None
    kind = PREDICTORS[policy.predictor]
    if kind.needs == "training-trace":
        if train_prompts is None:
            raise ValueError(f"policy {policy.name!r} trains its predictor: pass train_prompts (a workload other "
                             "than the measured one)")
        trace = collect_trace(model, train_prompts, new_tokens, budget=budget, device=device,
                              show_progress=show_progress)
        return kind.build(model, trace, show_progress=show_progress, **options)
    if kind.needs == "exact-trace":
        if run is None:
            raise ValueError(f"policy {policy.name!r} replays the served routing: pass run (the exact calls)")
        with recording_handle(model, budget, device) as handle:  # an offloaded model records on its own handle
            return record_calls(handle, run, past_end=past_end)
    raise ValueError(f"predictor {kind.name!r} declares unknown needs {kind.needs!r}")
