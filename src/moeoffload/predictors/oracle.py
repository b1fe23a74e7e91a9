"""The oracle: replays the recorded routing of the exact inputs being served (a CallTrace). It knows every
coming layer call's experts, so its prefetch and its Belady eviction are upper bounds, not policies one could
deploy. If the served calls stop matching the recording (other inputs), it warns and steps aside; past the
recording's end it warns too, unless the trace says the recording deliberately stops there (CallTrace.past_end)."""

from __future__ import annotations

import bisect
import math
import warnings

import torch

from ..cache import ExpertCache
from .traces import CallTrace

REBUILD_AFTER_CALLS = 256  # more passed calls than this since the last eviction: Belady rebuilds its heap


class OracleReplay:
    name = "oracle"

    def __init__(self, trace: CallTrace, cache: ExpertCache, prefetch: bool = True):
        self.trace = trace
        self.cache = cache
        self.prefetch = prefetch
        self.cursor = -1
        self.diverged = False  # stepped aside: no prefetch, no future for Belady (served as LRU)
        self.past_end_calls = 0  # calls served after the recording's end (an untimed pass after the measured ones)
        self._uses: dict[tuple[int, int], list[int]] = {}
        for c, (layer, experts) in enumerate(trace.calls):
            for e in experts:
                self._uses.setdefault((layer, e), []).append(c)

    def detach(self) -> None:
        pass

    def tap(self, layer_idx: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """Advance to the next recorded call; check it is this layer's."""
        self.cursor += 1
        if self.cursor >= len(self.trace.calls):
            self.past_end_calls += 1
            if self.trace.past_end == "lru":
                self.diverged = True
                return None
        if self.diverged:
            return None
        if self.cursor >= len(self.trace.calls):
            warnings.warn(f"moeoffload: more calls served than the oracle trace recorded ({len(self.trace.calls)}); "
                          "record all the served calls, or record with past_end='lru' when the rest is not measured. "
                          "Falling back to LRU without prefetch", RuntimeWarning, stacklevel=3)
            self.diverged = True
        elif self.trace.calls[self.cursor][0] != layer_idx:
            warnings.warn(f"moeoffload: oracle trace does not match the served calls at call {self.cursor} (layer "
                          f"{layer_idx}); record it on the same inputs. Falling back to LRU without prefetch",
                          RuntimeWarning, stacklevel=3)
            self.diverged = True
        return None

    def __call__(self, layer_idx: int, hidden: torch.Tensor) -> None:
        nxt = self.cursor + 1
        if self.prefetch and not self.diverged and nxt < len(self.trace.calls):
            layer, experts = self.trace.calls[nxt]
            self.cache.prefetch([(layer, e) for e in experts])

    def next_use(self, key: tuple[int, int]) -> float:
        return self.position(key) - self.cursor

    # -- positions (moeoffload.eviction.TracksPositions): Belady keeps a heap instead of scoring every resident --
    def position(self, key: tuple[int, int]) -> float:
        """The recorded call that next needs `key` (the running one included); inf: none, or stepped aside."""
        if self.diverged:
            return math.inf
        uses = self._uses.get(key)
        if not uses:
            return math.inf
        i = bisect.bisect_left(uses, max(self.cursor, 0))
        return float(uses[i]) if i < len(uses) else math.inf

    @property
    def version(self) -> tuple[bool, int]:
        return self.diverged, max(self.cursor, 0)

    def changed_since(self, version: tuple[bool, int]) -> list[tuple[int, int]] | None:
        """The keys whose position moved since `version`: those of the calls the cursor has passed since. None
        (all of them) once the oracle stepped aside, or when so many calls passed that a rebuild is cheaper."""
        diverged, then = version
        now = min(max(self.cursor, 0), len(self.trace.calls))
        if diverged != self.diverged or now - then > REBUILD_AFTER_CALLS:
            return None
        return [(layer, e) for layer, experts in self.trace.calls[then:now] for e in experts]
