"""Per-request latency and whole-run throughput, as MLPerf LoadGen's LLM scenarios measure them.

- offline: every request arrives at t=0; the figure is throughput (generated tokens / seconds to the last one);
- server: requests arrive open-loop as a seeded Poisson process; the run states its latency bound (TTFT and TPOT
  at a percentile, 99 by default) and is valid only when both percentiles are within it.
TTFT runs from a request's arrival (queueing included) to its first token; TPOT is a request's mean time between
later tokens. Failed requests count apart and never make a run valid that missed its bound.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .engine import ServingRun
from .requests import Request


def offline(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[Request]:
    """Every prompt as a request at t=0 (ids 0..n-1)."""
    return [Request(i, p, max_new_tokens) for i, p in enumerate(prompts)]


def poisson(prompts: Sequence[Sequence[int]], max_new_tokens: int, rate: float, seed: int = 0) -> list[Request]:
    """Open-loop arrivals: exponential gaps of mean 1/rate seconds, seeded; the first request comes at its gap."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate {rate!r}: pass requests per second > 0 (use offline() for every request at once)")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
    return [Request(i, p, max_new_tokens, float(t)) for i, (p, t) in enumerate(zip(prompts, np.cumsum(gaps)))]


@dataclass(frozen=True)
class LatencyBound:
    """The server scenario's constraint: TTFT and TPOT at `percentile` within these seconds."""

    ttft_s: float
    tpot_s: float
    percentile: float = 99.0

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0 and 0 < self.percentile <= 100):
            raise ValueError(f"latency bound {self}: seconds must be > 0 and the percentile in (0, 100]")


@dataclass(frozen=True)
class Summary:
    scheduler: str
    requests: int
    finished: int
    failed: int
    generated_tokens: int
    duration_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    decode_steps: int
    experts_per_decode_step: float  # mean distinct (layer, expert) pairs a decode step asked for; nan unoffloaded
    h2d_bytes_per_token: float  # bytes copied to the device per generated token (prefill copies included)
    bound: LatencyBound | None
    valid: bool | None  # None: no bound stated
    invalid_reason: str | None
    failed_ids: tuple[Hashable, ...]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bound"] = None if self.bound is None else asdict(self.bound)
        d["failed_ids"] = [repr(i) for i in self.failed_ids]
        return d


def summarize(run: ServingRun, bound: LatencyBound | None = None) -> Summary:
    """The run's throughput, latency percentiles and, when `bound` is given, whether it met it."""
    done = [r for r in run.results if r.ok]
    failed = tuple(r.request_id for r in run.results if not r.ok)
    tokens = sum(len(r.tokens) for r in run.results)
    start = min((r.arrival for r in run.results), default=0.0)
    end = max((r.finished for r in run.results if r.finished is not None), default=start)
    duration = end - start
    ttft = [r.ttft for r in done if r.ttft is not None]
    tpot = [r.tpot for r in done if r.tpot is not None]
    pct = bound.percentile if bound is not None else 99.0
    decode = [s for s in run.steps if s.kind == "decode"]
    experts = [s.experts for s in decode if s.experts is not None]
    moved = [s.h2d_bytes for s in run.steps if s.h2d_bytes is not None]
    valid, reason = _verdict(bound, _pct(ttft, pct), _pct(tpot, pct))
    return Summary(run.scheduler, len(run.results), len(done), len(failed), tokens, duration,
                   tokens / duration if duration > 0 else math.nan, _pct(ttft, 50), _pct(ttft, pct),
                   _pct(tpot, 50), _pct(tpot, pct), len(decode),
                   float(np.mean(experts)) if experts else math.nan,
                   sum(moved) / tokens if moved and tokens else math.nan, bound, valid, reason, failed)


def _verdict(bound: LatencyBound | None, ttft: float, tpot: float) -> tuple[bool | None, str | None]:
    if bound is None:
        return None, None
    misses = []
    if not ttft <= bound.ttft_s:  # nan (no request finished) misses too
        misses.append(f"TTFT p{bound.percentile:g} {ttft:.4g}s > {bound.ttft_s:g}s")
    if not (math.isnan(tpot) or tpot <= bound.tpot_s):  # nan: no request made two tokens, nothing to miss
        misses.append(f"TPOT p{bound.percentile:g} {tpot:.4g}s > {bound.tpot_s:g}s")
    return (not misses), ("; ".join(misses) or None)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan
