"""`--moebench-time-limit`: start no case that would end past the limit, judged by how long such a case took.

A suite's first case of a model builds that model, fills its host store and runs its resident reference: at
published size a minute or two, where the model's later cases take seconds. Judging every case by the longest one
so far (the first, always) skipped cases that would have fit (switch-base-256 on the H100: 11 cases not started
with 147 s left, each of its later cases having taken well under a minute). So cases are judged by their own kind:
one that builds its model by the longest such case, one that finds its model built by the longest of those (by the
longest of any kind until one has run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class Deadline:
    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit_s = limit_s
        self._clock = clock
        self._started = clock()
        self._built: set[Hashable] = set()
        self._longest = {True: 0.0, False: 0.0}  # builds its model -> the longest such case so far, seconds

    def refusal(self, model: Hashable) -> str | None:
        """Why the next case, of `model`, is not started (None: start it)."""
        builds = model not in self._built
        expected = self._longest[builds] or max(self._longest.values())
        elapsed = self._clock() - self._started
        if elapsed + expected <= self.limit_s:
            return None
        kind = "a case that builds its model" if builds else "a case of a model already built"
        return (f"--moebench-time-limit {self.limit_s:g}s: not started at {elapsed:.0f}s ({kind} took up to "
                f"{expected:.0f}s so far)")

    def run(self, model: Hashable, case: Callable[[], object]) -> object:
        """Run `case` (of `model`) and remember how long it took, whatever its outcome."""
        builds = model not in self._built
        t0 = self._clock()
        try:
            return case()
        finally:
            self._built.add(model)
            self._longest[builds] = max(self._longest[builds], self._clock() - t0)
