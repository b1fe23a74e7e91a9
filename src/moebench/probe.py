"""Machine-speed probe: a fixed workload timed beside every round, so a verdict can divide out the machine's drift.

Why: on an H100 80GB HBM3 in a VM the same code's speed drifted by tens of percent over tens of seconds. In one run of
20 rounds of switch-base-8 (benchmarks/results/h100-2026-11-23c/stats_nightly) the rounds' median step stepped from
36 ms to 23 ms with nothing changed, and slow spells lasted several rounds. No statistic on the rounds alone can
tell such a spell from a 5% regression between two runs taken minutes apart. The probe runs code this project does
not own (interpreter work, small kernel launches with a device sync, a fixed GEMM, a pinned host-to-device copy:
what a decode step is made of) right before every round and after the last. A round's machine-normalized throughput
is its tokens/s times the mean duration of the two probes around it (tokens per probe-time): a spell that slows the
machine slows the probe too and cancels, while a regression in the measured code does not. Measured there
(benchmarks/results/h100-2026-11-23e/stats_power_blocks.txt): the VM ran at two speeds, and on resampled unchanged
rounds the normalized verdict raised 0-2.4% false alarms where raw tokens/s raised 14-17%. It tracks the machine
imperfectly (correlation +0.5 to +0.64 within runs), so it lowers false alarms more than it raises the power to see
a small slowdown.

The probe's parts are timed apart (`ProbeTiming`) so that `benchmarks/stats_device.py` can show which of them
tracks the rounds on a given machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["PROBE_PARTS", "MachineProbe", "ProbeTiming", "normalized"]

PROBE_PARTS = ("python_s", "launch_s", "gemm_s", "copy_s", "total_s")


@dataclass(frozen=True)
class ProbeTiming:
    """Seconds spent in each part of one probe; `total` is what normalizes a round."""

    python_s: float
    launch_s: float
    gemm_s: float
    copy_s: float

    @property
    def total(self) -> float:
        return self.python_s + self.launch_s + self.gemm_s + self.copy_s

    def as_dict(self) -> dict[str, float]:
        return {"python_s": self.python_s, "launch_s": self.launch_s, "gemm_s": self.gemm_s, "copy_s": self.copy_s,
                "total_s": self.total}


class MachineProbe:
    """The fixed workload, its inputs built once per device.

    On a CPU the GEMM and the launches run on the CPU and the copy is skipped. About 7-9 ms a probe on an H100 80GB HBM3
    VM at its full speed, 10-14 ms in its slow spells (benchmarks/results/h100-2026-11-23e); `scale` multiplies every
    part's repetitions (tests use a small one).
    """

    def __init__(self, device: str = "cpu", scale: float = 1.0):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.launch_iters = max(1, int(60 * scale))
        self.gemm_iters = max(1, int(8 * scale))
        self.python_iters = max(1, int(20000 * scale))
        g = torch.Generator().manual_seed(0)
        self.small = torch.randn(8, 512, generator=g).to(self.device)
        self.small_w = torch.randn(512, 512, generator=g).to(self.device)
        n = 2048 if self.cuda else 256
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.big = torch.randn(n, n, generator=g).to(self.device, dtype)
        self.host = torch.empty(4 << 20, dtype=torch.uint8, pin_memory=True) if self.cuda else None  # 4 MiB
        self.dest = torch.empty(4 << 20, dtype=torch.uint8, device=self.device) if self.cuda else None

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def run(self) -> ProbeTiming:
        import torch

        with torch.no_grad():
            self._sync()
            t0 = time.perf_counter()
            acc: dict[int, int] = {}
            for i in range(self.python_iters):  # interpreter speed: what a hook's bookkeeping costs
                acc[i & 255] = acc.get(i & 255, 0) + i
            t1 = time.perf_counter()
            x = self.small
            for _ in range(self.launch_iters):  # a decode layer's small ops, then the router's device->host sync
                h = torch.softmax(x @ self.small_w, dim=-1)
                x = (h * 0.5 + x * 0.5).contiguous()
                torch.topk(h, 2, dim=-1).indices.sum().item()
            t2 = time.perf_counter()
            y = self.big
            for _ in range(self.gemm_iters):  # the device's own speed (clocks)
                y = self.big @ y
            self._sync()
            t3 = time.perf_counter()
            if self.cuda:  # the host-to-device link
                assert self.host is not None and self.dest is not None
                self.dest.copy_(self.host, non_blocking=True)
                self._sync()
            t4 = time.perf_counter()
        return ProbeTiming(t1 - t0, t2 - t1, t3 - t2, t4 - t3)


def normalized(values: list[float], probe_totals: list[float], *, per_time: bool = True) -> list[float]:
    """Per-round values in units of the probe's speed, so that a uniform slowdown of the machine cancels: a rate
    (`per_time`, e.g. tokens/s) times, a duration (e.g. p50 ms) divided by, the mean of the probes right before
    and after that round (n values, n + 1 probes)."""
    if len(probe_totals) != len(values) + 1:
        raise ValueError(f"{len(values)} rounds need {len(values) + 1} probe timings (one before each round and one "
                         f"after the last), got {len(probe_totals)}")
    around = [(probe_totals[i] + probe_totals[i + 1]) / 2 for i in range(len(values))]
    return [v * a if per_time else v / a for v, a in zip(values, around)]
