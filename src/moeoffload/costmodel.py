"""Copy a missed expert or compute it on the host: the measured costs, the per-miss choices, the combined floor.

A miss can be served two ways that run at the same time: the copy engine moves the expert's bytes over PCIe (its
time: bytes / pinned H2D bandwidth, whatever the token count), or the host CPU computes its FFN from the store
(its time grows with the tokens routed to it; at a few tokens it is a read of the expert's bytes from host memory).
`Measurements` holds both, measured on the machine by `measure` or given by a test; the choosers read nothing else.

- "host" (llama.cpp --cpu-moe): every miss on the host.
- "cost-model" (Fiddler): each miss where it finishes sooner, judged alone.
- "split" (HybriMoE): the misses with the highest score are copied (the cache admits them), the rest computed on
  the host, the cut placed where the copy engine and the host finish closest to together.
The floor of a case: its missed bytes split between the two so that both end together, each at its own bandwidth.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .store import ExpertStore

if TYPE_CHECKING:
    from .hostexperts import HostExperts

GEMM_TOKENS = (1, 4, 16, 64, 256)  # token counts at which one expert's host FFN is timed
ExpertFFN = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Measurements:
    """What one machine does with one model's experts; times in seconds, bandwidths in bytes per second."""

    expert_bytes: int
    h2d_bytes_per_s: float  # pinned host -> device, one expert per copy
    host_read_bytes_per_s: float  # host memory read by `host_threads` threads
    host_threads: int
    gemm_tokens: tuple[int, ...]  # ascending
    gemm_seconds: tuple[float, ...]  # one expert's FFN on the host at each of gemm_tokens
    # what one routed row moves across PCIe when the host computes it: its activations, gate weight and token index
    # to the host in fp32, its output back (paths.host packs them); 0 where the hidden size is not known
    row_bytes: int = 0

    def __post_init__(self) -> None:
        if self.h2d_bytes_per_s <= 0 or self.host_read_bytes_per_s <= 0:
            raise ValueError("bandwidths must be positive")
        if not self.gemm_tokens or len(self.gemm_tokens) != len(self.gemm_seconds) or \
                list(self.gemm_tokens) != sorted(set(self.gemm_tokens)):
            raise ValueError("gemm_tokens must be ascending and distinct, one time per token count")

    def copy_seconds(self) -> float:
        return self.expert_bytes / self.h2d_bytes_per_s

    def host_seconds(self, tokens: int) -> float:
        """One expert's host FFN over `tokens` rows: linear between the timed counts, the last step's slope past
        them, the first time below them (a read of the weights costs at least that)."""
        ts, ss = self.gemm_tokens, self.gemm_seconds
        i = bisect.bisect_left(ts, tokens)
        if i < len(ts) and ts[i] == tokens or i == 0 or len(ts) == 1:
            return ss[min(i, len(ts) - 1)]
        lo = min(i, len(ts) - 1) - 1
        slope = (ss[lo + 1] - ss[lo]) / (ts[lo + 1] - ts[lo])
        return ss[lo] + slope * (tokens - ts[lo])

    def host_miss_seconds(self, tokens: int) -> float:
        """A miss computed on the host: its FFN there, and its rows' activations across the link both ways (Fiddler
        counts both; at batch 1 the activations are kilobytes against the expert's hundreds of MiB)."""
        return self.host_seconds(tokens) + tokens * self.row_bytes / self.h2d_bytes_per_s

    def as_dict(self) -> dict:
        return {"expert_bytes": self.expert_bytes, "h2d_GBps": self.h2d_bytes_per_s / 1e9,
                "host_read_GBps": self.host_read_bytes_per_s / 1e9, "host_threads": self.host_threads,
                "host_ffn_ms": {t: s * 1e3 for t, s in zip(self.gemm_tokens, self.gemm_seconds)},
                "row_bytes": self.row_bytes}


def on_host(mode: str, m: Measurements | None, rows: dict[int, int], scores: dict[int, float]) -> set[int]:
    """The missed experts (expert -> its routed rows) to compute on the host under `mode`; the rest are copied."""
    if mode == "copy" or not rows:
        return set()
    if mode == "host":
        return set(rows)
    if m is None:
        raise ValueError(f"misses={mode!r} needs measurements (moeoffload.costmodel.measure)")
    if mode == "cost-model":
        return {e for e, n in rows.items() if m.host_miss_seconds(n) < m.copy_seconds()}
    if mode == "split":
        return split(m, rows, scores)
    raise ValueError(f"misses={mode!r} is unknown; use 'copy', 'host', 'cost-model' or 'split'")


def split(m: Measurements, rows: dict[int, int], scores: dict[int, float]) -> set[int]:
    """Copy the c highest-scoring misses, compute the rest on the host; c makes max(copy time, host time) least
    (ties: fewer on the host). The host computes its experts one after another, the copy engine copies its own."""
    ranked = sorted(rows, key=lambda e: (-scores.get(e, 0.0), e))
    host_after = [0.0] * (len(ranked) + 1)  # host time of ranked[c:]
    for c in range(len(ranked) - 1, -1, -1):
        host_after[c] = host_after[c + 1] + m.host_miss_seconds(rows[ranked[c]])
    best = min(range(len(ranked) + 1), key=lambda c: (max(c * m.copy_seconds(), host_after[c]), -c))
    return set(ranked[best:])


def combined_floor(missed_bytes: float, m: Measurements) -> float:
    """Seconds to serve `missed_bytes` of missed experts at best: split between the copy engine and the host's
    memory reads so that both finish together. Ignores compute, so no plan can beat it."""
    return missed_bytes / (m.h2d_bytes_per_s + m.host_read_bytes_per_s)


def copy_floor(missed_bytes: float, m: Measurements) -> float:
    return missed_bytes / m.h2d_bytes_per_s


def measure(store: ExpertStore, device: torch.device, ffn: ExpertFFN, hidden_size: int, host: HostExperts,
            repeats: int = 5) -> Measurements:
    """Measure this machine on this store's first expert: the pinned copy to `device`, the host's read bandwidth
    and its FFN time by token count, both on the host-expert worker (its threads and dtype, as the host
    computation runs)."""
    dtype = host.dtype
    source = store.buffer((0, 0))
    h2d = store.expert_bytes / _median_seconds(_copier(source, device), repeats)
    slab = store.slab(0)
    word = slab.view(torch.uint8)[: slab.numel() * slab.element_size() // 4 * 4].view(torch.int32)

    def host_side() -> tuple[float, list[float]]:
        read = word.numel() * 4 / _median_seconds(lambda: word.sum(), repeats)
        times = []
        for tokens in GEMM_TOKENS:
            x = torch.randn(tokens, hidden_size, dtype=dtype)
            def one_expert(x: torch.Tensor = x) -> None:
                ffn(x, host.weights(0, 0))  # the weights' widening included

            times.append(_median_seconds(one_expert, repeats))
        return read, times

    read, times = host.run(host_side)
    row_bytes = (2 * hidden_size + 2) * 4  # paths.host: [H + 2] fp32 to the host, [H] back (per token: at most)
    return Measurements(store.expert_bytes, h2d, read, host.threads, GEMM_TOKENS, tuple(times), row_bytes)


def _copier(source: torch.Tensor, device: torch.device) -> Callable[[], object]:
    target = torch.empty_like(source, device=device)
    if device.type != "cuda":
        return lambda: target.copy_(source)
    stream = torch.cuda.Stream(device)

    def copy() -> None:
        with torch.cuda.stream(stream):
            target.copy_(source, non_blocking=True)
        stream.synchronize()

    return copy


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: first-touch pages, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(statistics.median(times), 1e-9)
