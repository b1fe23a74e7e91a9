"""Clocks of the serving loop: wall time for real runs, a manual clock for tests (no sleeping, exact times)."""

from __future__ import annotations

import time


class WallClock:
    """Seconds since the run started (`time.perf_counter`). The loop reads generated tokens on the host each
    step, which waits for the device, so a time read after a step includes the step's device work."""

    def __init__(self):
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class ManualClock:
    """A clock that moves only when told: `advance(dt)` (a fake model's compute time) or `sleep_until`."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def start(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
