"""Throughput workloads: many requests through an offloaded model with moeoffload's serving loop, one record each.

MoE-Gen (arXiv 2503.09716) measures offloaded MoE decoding offline with 512-token prompts and 256 new tokens;
`MOE_GEN` is that workload. A record holds the run's throughput and latency (moeoffload.serving.summarize), what
the expert cache did (distinct experts per decode step, bytes moved per token) and the workload's I/O floor: at
the start of a step at most `n_slots` of the experts it needs can be resident, so every step copies at least
`max(0, distinct experts - n_slots)` experts whatever the policy; their bytes over the pinned host-to-device
bandwidth are a time no run of this grouping can beat. Prompts are windows of the held-out text when the model has
a tokenizer (`text="heldout"`, as the suites' workloads), else seeded random ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .workload import Arrivals


@dataclass(frozen=True)
class ThroughputWorkload:
    """`requests` prompts of `prompt_tokens` tokens (moebench.workload's held-out text or random ids), `new_tokens`
    each; offline (every request at t=0) unless `arrivals` makes them a Poisson process. Serving knobs:
    `max_batch` requests per decode step, `prefill_chunk` prompt tokens per step, `kv_budget` (tokens, bytes such
    as "8GiB", or None)."""

    name: str = "moe-gen"
    requests: int = 64
    prompt_tokens: int = 512
    new_tokens: int = 256
    seed: int = 0
    text: str = "heldout"  # "heldout": windows of the held-out text when the model has a tokenizer; "synthetic"
    max_batch: int = 64
    prefill_chunk: int = 512
    kv_budget: int | str | None = None
    arrivals: Arrivals | None = None
    ttft_bound_s: float | None = None  # the server scenario's latency bound (both or neither)
    tpot_bound_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "new_tokens", "max_batch", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ThroughputWorkload.{name} must be a positive int, got {value!r}")
        if (self.ttft_bound_s is None) != (self.tpot_bound_s is None):
            raise ValueError("ThroughputWorkload: give both ttft_bound_s and tpot_bound_s (a latency bound), or none")
        if self.arrivals is not None and self.arrivals.requests != self.requests:
            raise ValueError(f"ThroughputWorkload: arrivals for {self.arrivals.requests} requests, workload has "
                             f"{self.requests}; make them equal")

    def build(self, vocab_size: int, tokenizer=None) -> list:
        """The requests, the same for the same seed (and tokenizer)."""
        from moeoffload.serving import Request

        from .workload import Workload

        prompts = Workload(batch_size=self.requests, prompt_len=self.prompt_tokens, new_tokens=self.new_tokens,
                           seed=self.seed, text=self.text)
        ids = prompts.prompts(vocab_size, tokenizer=tokenizer)
        times = self.arrivals.times() if self.arrivals is not None else [0.0] * self.requests
        return [Request(i, ids[i], self.new_tokens, t) for i, t in enumerate(times)]

    def bound(self):
        from moeoffload.serving import LatencyBound

        return None if self.ttft_bound_s is None else LatencyBound(self.ttft_bound_s, self.tpot_bound_s)


MOE_GEN = ThroughputWorkload()


def io_floor_bytes(run, n_slots: int, expert_bytes: int) -> int:
    """Bytes every policy must copy to serve `run`'s steps with `n_slots` expert slots (module docstring)."""
    return sum(max(0, s.experts - n_slots) for s in run.steps if s.experts is not None) * expert_bytes


def serve_workload(model, workload: ThroughputWorkload = MOE_GEN, *, scheduler="auto", clock=None):
    """Serve `workload` through `model` (offloaded with moeoffload.offload) with the cache's statistics reset
    first; returns (moeoffload.serving.ServingRun, the handle's OffloadStats after it)."""
    from moeoffload.serving import Server

    handle = getattr(model, "_moeoffload", None)
    if handle is None:
        raise ValueError("run_workload measures an offloaded model; call moeoffload.offload(model, policy, budget) "
                         "first")
    server = Server(model, scheduler=scheduler, kv_budget=workload.kv_budget, max_batch=workload.max_batch,
                    prefill_chunk=workload.prefill_chunk, clock=clock)
    handle.reset_stats()
    from .workload import find_tokenizer

    run = server.run(workload.build(model.config.vocab_size, find_tokenizer(model)))
    return run, handle.stats()


def run_workload(model, workload: ThroughputWorkload = MOE_GEN, *, scheduler="auto", h2d_bandwidth: float | None = None,
                 clock=None) -> dict:
    """Serve `workload` through `model` (offloaded with moeoffload.offload) and return its record.
    `h2d_bandwidth`: pinned host-to-device bytes/s measured on this machine, for the I/O floor's time."""
    from .workload import find_tokenizer

    run, stats = serve_workload(model, workload, scheduler=scheduler, clock=clock)
    return {
        "workload": {k: v for k, v in asdict(workload).items() if k != "arrivals"},
        "prompts": "heldout text" if find_tokenizer(model) is not None and workload.text == "heldout" else "random ids",
        "arrivals": asdict(workload.arrivals) if workload.arrivals is not None else "offline",
        "policy": stats.policy, "budget_bytes": stats.budget_bytes, "n_slots": stats.n_slots,
        "expert_bytes": stats.expert_bytes, "kernels": stats.kernels, "fetch": stats.fetch,
        **run_figures(run, stats, workload, h2d_bandwidth),
    }


def run_figures(run, stats, workload: ThroughputWorkload, h2d_bandwidth: float | None) -> dict:
    """A served run's throughput, latency, cache figures and I/O floor (`summarize`, `io_floor_bytes`)."""
    from moeoffload.serving import summarize

    summary = summarize(run, workload.bound())
    floor = io_floor_bytes(run, stats.n_slots, stats.expert_bytes)
    floor_s = floor / h2d_bandwidth if h2d_bandwidth else math.nan
    decode_experts = [s.experts for s in run.steps if s.kind == "decode" and s.experts is not None]
    return {
        **summary.as_dict(),
        "max_experts_per_decode_step": max(decode_experts, default=0),
        "h2d_bytes": stats.h2d_bytes, "hit_rate": stats.hit_rate,
        "io_floor_bytes": floor, "h2d_bandwidth": h2d_bandwidth, "io_floor_s": floor_s,
        "x_io_floor": summary.duration_s / floor_s if floor_s and floor_s == floor_s else math.nan,
        "scheduler_errors": len(run.scheduler_errors),
    }
