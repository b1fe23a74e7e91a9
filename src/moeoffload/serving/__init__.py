"""Serving many requests through an offloaded model: continuous batching, a KV budget, chunked prefill, and a
scheduler seam (first-come, or ExpertFlow's route grouping). See docs/serving.md.

    from moeoffload.serving import Request, serve
    run = serve(model, [Request(i, ids, max_new_tokens=64) for i, ids in enumerate(prompts)], kv_budget="4GiB")
    run.results[0].tokens, summarize(run, LatencyBound(ttft_s=2.0, tpot_s=0.2))
"""

from .clock import ManualClock, WallClock
from .engine import Server, ServingRun, StepRecord, serve
from .metrics import LatencyBound, Summary, offline, poisson, summarize
from .requests import Request, Result, TokenEvent
from .schedulers import ExpertFlow, FirstCome, Scheduler, SequenceView

__all__ = ["ExpertFlow", "FirstCome", "LatencyBound", "ManualClock", "Request", "Result", "Scheduler",
           "SequenceView", "Server", "ServingRun", "StepRecord", "Summary", "TokenEvent", "WallClock", "offline",
           "poisson", "serve", "summarize"]
