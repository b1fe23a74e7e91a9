"""Eviction rules: which resident expert gives up its cache slot when a miss needs one.

A rule only orders keys; the cache decides which keys may be evicted at all (never a pinned one: an expert
that a running computation still reads). Rules are registered by name so that policies name them as data.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .contracts import built_rule
from .store import ExpertKey


class EvictionRule(Protocol):
    name: str

    def on_insert(self, key: ExpertKey) -> None: ...
    def on_access(self, key: ExpertKey) -> None: ...
    def on_remove(self, key: ExpertKey) -> None: ...
    # optional: def on_layer(self, layer: int) -> None, told when a MoE layer starts computing (NextUse needs it)
    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        """The key to evict among `candidates` (resident and unpinned, never empty)."""
        ...


def membership(candidates: Iterable[ExpertKey]):
    """`candidates` as something with a fast `in`: the cache passes a lazy view of its evictable keys (O(1)
    membership, no list of every resident expert per eviction); anything else is made a set."""
    if isinstance(candidates, (set, frozenset)) or getattr(candidates, "fast_membership", False):
        return candidates
    return set(candidates)


class LRU:
    """Least recently used: the expert touched longest ago leaves first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: ExpertKey) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def __iter__(self):
        """The keys, least recently used first."""
        return iter(self._order)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        allowed = membership(candidates)
        for key in self._order:
            if key in allowed:
                return key
        raise LookupError("no evictable expert among the candidates")


class FIFO(LRU):
    """First in, first out: residency order only; a hit does not refresh an expert."""

    name = "fifo"

    def on_access(self, key: ExpertKey) -> None:
        pass


class ScoreBuckets:
    """Keys grouped by a score, each group in recency order (the key touched longest ago first), with the groups'
    scores kept sorted: the lowest-scored, least recently touched evictable key is found by walking from the front,
    which usually stops at the first key. The scan of every resident that this replaces cost LFU 89-139 us and the
    prior-frequency rule 890-1376 us per eviction at OLMoE's 256-slot cache, against 17-20 and 14-19 us now (LRU:
    8-12; benchmarks/eviction_overhead.py on a CPU): the frequency policy ran OLMoE on the H100 at 7 tok/s for it."""

    def __init__(self) -> None:
        self._groups: dict[float, OrderedDict[ExpertKey, None]] = {}
        self._scores: list[float] = []  # sorted scores of the non-empty groups
        self._score_of: dict[ExpertKey, float] = {}

    def put(self, key: ExpertKey, score: float) -> None:
        """Place `key` last (most recent) in the group of `score`, wherever it was."""
        self.remove(key)
        group = self._groups.get(score)
        if group is None:
            group = self._groups[score] = OrderedDict()
            bisect.insort(self._scores, score)
        group[key] = None
        self._score_of[key] = score

    def keys(self) -> list[ExpertKey]:
        return list(self._score_of)

    def touch(self, key: ExpertKey) -> None:
        """Make `key` the most recent of its group."""
        self._groups[self._score_of[key]].move_to_end(key)

    def remove(self, key: ExpertKey) -> None:
        score = self._score_of.pop(key, None)
        if score is None:
            return
        group = self._groups[score]
        del group[key]
        if not group:
            del self._groups[score]
            self._scores.pop(bisect.bisect_left(self._scores, score))

    def lowest(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        """The allowed key of the lowest score, the least recently touched among equals."""
        allowed = membership(candidates)
        for score in self._scores:
            for key in self._groups[score]:
                if key in allowed:
                    return key
        raise LookupError("no evictable expert among the candidates")


class LFU:
    """Least frequently used, counting every use since the cache was built (an evicted expert keeps its count,
    so popular experts win their slot back); ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertKey, float] = {}
        self._resident = ScoreBuckets()  # by count; a group's order is recency, since every use changes the group
        self._unit = 1.0  # what a use adds

    def _use(self, key: ExpertKey) -> None:
        self._count[key] = self._count.get(key, 0.0) + self._unit
        self._resident.put(key, self._count[key])

    def on_insert(self, key: ExpertKey) -> None:
        self._use(key)

    def on_access(self, key: ExpertKey) -> None:
        self._use(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._resident.remove(key)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        return self._resident.lowest(candidates)


class DecayedLFU(LFU):
    """Frequency with a half-life: every use adds one, and what was added fades by half every `HALF_LIFE_STEPS`
    decode steps (HybriMoE's score-aware caching keeps the experts with the highest recent routing score). Plain LFU
    keeps a prefill's or an old topic's experts for good; this lets them go once the routing has moved on. Ties go to
    the least recently used.

    A step starts when a layer at or before the last one seen starts (`on_layer`). Instead of decaying every score
    each step, a use adds 2**(steps since the last rescale / half-life), which orders keys as the decayed sums do;
    the scores are divided by that unit when it grows large."""

    name = "lfu-decay"
    HALF_LIFE_STEPS = 4.0
    RESCALE_AT = 1e100

    def __init__(self) -> None:
        super().__init__()
        self._steps = 0  # since the last rescale
        self._last_layer = -1

    def on_layer(self, layer: int) -> None:
        if layer <= self._last_layer:
            self._steps += 1
            self._unit = 2.0 ** (self._steps / self.HALF_LIFE_STEPS)  # not a running product: no drift
            if self._unit > self.RESCALE_AT:
                self._rescale()
        self._last_layer = layer

    def _rescale(self) -> None:
        unit, resident = self._unit, self._resident.keys()  # keys() is recency order: ties keep it
        self._count = {k: v / unit for k, v in self._count.items() if v / unit > 1e-300}
        self._steps, self._unit = 0, 1.0
        self._resident = ScoreBuckets()
        for key in resident:
            self._resident.put(key, self._count.get(key, 0.0))


class Belady:
    """Farthest next use leaves first (Belady's MIN): with the true future this is the best any demand cache can
    do, an upper bound on hit rate. The future comes from a bound source with `next_use(key) -> float` (inf:
    never again): a recorded trace of the same inputs (the bound), or a predictor (SiDA: evict the experts the
    batch will not need). Ties, and everything before `bind`, go to the least recently used.

    A future that also gives positions (`TracksPositions`: the oracle's trace) lets the rule keep its residents in a
    heap by next use and pop the farthest. Scoring every resident per eviction had cost milliseconds at
    Qwen3-30B-A3B's 1536 slots, where the whole recorded future needs almost every resident again."""

    name = "belady"

    def __init__(self) -> None:
        self.future: Any = None  # next_use(key) (a RunAhead), or TracksPositions too (the oracle)
        self._recency = LRU()
        self._touched: dict[ExpertKey, int] = {}  # resident key -> the tick of its last insert or access
        self._tick = 0
        self._heap: list[tuple[float, int, ExpertKey]] = []  # (-position, tick, key): farthest, then least recent
        self._seen = None  # the future's version the heap is up to date with (None: rebuild)
        self._positional = False  # the bound future gives positions: keep the heap

    def bind(self, future) -> None:
        self.future = future
        self._seen = None
        self._positional = isinstance(future, TracksPositions)  # once here, not per eviction

    def on_insert(self, key: ExpertKey) -> None:
        self._recency.on_insert(key)
        self._touch(key)

    def on_access(self, key: ExpertKey) -> None:
        self._recency.on_access(key)
        self._touch(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._recency.on_remove(key)
        self._touched.pop(key, None)  # its heap entries go stale, dropped when they surface

    def _touch(self, key: ExpertKey) -> None:
        self._tick += 1
        self._touched[key] = self._tick
        if self._seen is not None:  # a heap is kept: this key's entry now carries the new tick
            heapq.heappush(self._heap, (-self.future.position(key), self._tick, key))
            if len(self._heap) > 4 * len(self._touched) + 64:
                self._rebuild()

    def _rebuild(self) -> None:
        position = self.future.position
        self._heap = [(-position(k), tick, k) for k, tick in self._touched.items()]
        heapq.heapify(self._heap)

    def _sync(self) -> None:
        """Bring the heap up to the future's present: a new entry for every resident whose next use moved."""
        future = self.future
        version = future.version
        if self._seen is not None and version == self._seen:
            return
        changed = None if self._seen is None else future.changed_since(self._seen)
        self._seen = version
        if changed is None:
            self._rebuild()
            return
        for key in changed:
            tick = self._touched.get(key)
            if tick is not None:
                heapq.heappush(self._heap, (-future.position(key), tick, key))

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        if self.future is None:
            return self._recency.victim(candidates)
        allowed = membership(candidates)
        if self._positional and getattr(allowed, "fast_membership", False):
            key = self._pop_farthest(allowed)
            if key is not None:
                return key
        return self._scan(allowed)

    def _pop_farthest(self, allowed) -> ExpertKey | None:
        self._sync()
        position, heap, aside = self.future.position, self._heap, []
        try:
            while heap:
                neg, tick, key = heap[0]
                if self._touched.get(key) != tick or -neg != position(key):
                    heapq.heappop(heap)  # removed, touched since, or moved: a newer entry stands for it
                elif key not in allowed:
                    aside.append(heapq.heappop(heap))  # pinned now, still resident: it keeps its place
                else:
                    return key  # its entry stays: it goes stale when the cache removes the key
            return None
        finally:
            for entry in aside:
                heapq.heappush(heap, entry)

    def _scan(self, allowed) -> ExpertKey:
        next_use = self.future.next_use
        # most residents are not needed again by what the future knows (inf, the farthest): the least recent of
        # those is the answer, found without scoring every resident
        for key in self._recency:
            if key in allowed and next_use(key) == math.inf:
                return key
        distance = {k: next_use(k) for k in allowed}
        farthest = max(distance.values())
        return self._recency.victim(k for k in distance if distance[k] == farthest)


@runtime_checkable
class TracksPositions(Protocol):
    """A future that orders next uses by position: `position(key)` is where the key is next needed on an axis that
    only moves forward (inf: never), so the distance is `position - now` for every key alike. Positions change only
    for the keys `changed_since(version)` names (None: any may have), and `version` changes whenever some do."""

    version: object

    def position(self, key: ExpertKey) -> float: ...
    def changed_since(self, version) -> Iterable[ExpertKey] | None: ...
    def next_use(self, key: ExpertKey) -> float: ...


class PriorFrequency:
    """The expert used least often in a recorded trace leaves first (MoE-Infinity's activation statistics, as a
    static prior): popular experts keep their slots. The prior is bound as `frequency(key) -> float`; ties and
    everything before `bind` go to the least recently used."""

    name = "prior-frequency"

    def __init__(self) -> None:
        self.prior = None
        self._recency = LRU()
        self._resident = ScoreBuckets()  # by prior frequency, each group in recency order

    def bind(self, prior) -> None:
        self.prior = prior
        self._resident = ScoreBuckets()
        for key in self._recency:  # oldest first, so each group keeps recency order
            self._resident.put(key, prior.frequency(key))

    def on_insert(self, key: ExpertKey) -> None:
        self._recency.on_insert(key)
        if self.prior is not None:
            self._resident.put(key, self.prior.frequency(key))

    def on_access(self, key: ExpertKey) -> None:
        self._recency.on_access(key)
        if self.prior is not None:
            self._resident.touch(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._recency.on_remove(key)
        self._resident.remove(key)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        if self.prior is None:
            return self._recency.victim(candidates)
        return self._resident.lowest(candidates)


class NextUse:
    """Farthest *expected* next use leaves first: Belady's rule with the future estimated from the one thing a
    decoder always knows, that its MoE layers run in a fixed cycle. An expert of layer l is needed no sooner than
    the layers between the current one and l have run (d = 1..L layer calls, the current layer's own idle experts
    last), and each visit of its layer that passed without it pushes its expected next use a whole cycle further:
    score = d + L * missed visits. When every expert is used at every step (large batches: a decode step touches
    each layer's whole expert set) this is exactly Belady's choice, where LRU evicts precisely the expert needed
    next and misses on every request once the cycle exceeds the cache; with sparse use it falls back to
    recency counted in cycles. Ties go to the least recently used. Needs `on_layer` from the cache (the layer
    that starts computing); without it every distance is equal and the rule is LRU.

    A victim costs O(layers), not O(resident experts): within a layer the least recently used key has the most
    missed visits, so only each layer's oldest evictable key is scored."""

    name = "next-use"

    def __init__(self) -> None:
        self._current = -1  # the MoE layer computing now
        self._layers = 0  # cycle length: 1 + the largest layer index seen
        self._visits: dict[int, int] = {}  # layer -> how many times it has started
        self._last: dict[ExpertKey, int] = {}  # key -> the visit of its layer that last used it
        self._tick: dict[ExpertKey, int] = {}  # key -> global recency (ties across layers)
        self._clock = 0
        self._by_layer: dict[int, OrderedDict[ExpertKey, None]] = {}  # resident keys of a layer, oldest first

    def on_layer(self, layer: int) -> None:
        self._current = layer
        self._layers = max(self._layers, layer + 1)
        self._visits[layer] = self._visits.get(layer, 0) + 1

    def _touch(self, key: ExpertKey) -> None:
        layer = key[0]
        self._layers = max(self._layers, layer + 1)
        visits = self._visits.get(layer, 0)
        # a key brought in for a layer that has not started yet (a prefetch) is meant for its next visit
        self._last[key] = visits if layer == self._current else visits + 1
        self._clock += 1
        self._tick[key] = self._clock
        order = self._by_layer.setdefault(layer, OrderedDict())
        order[key] = None
        order.move_to_end(key)

    def on_insert(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_access(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._last.pop(key, None)
        self._tick.pop(key, None)
        order = self._by_layer.get(key[0])
        if order is not None:
            order.pop(key, None)

    def __iter__(self):
        """The resident keys, least recently used first (the device directory's stamps follow this order)."""
        return iter(sorted(self._tick, key=self._tick.__getitem__))

    def cycle(self) -> Cycle:
        """The rule's state besides recency, as the device directory keeps it (`moeoffload.directory`)."""
        return Cycle(self._current, self._layers, dict(self._visits), dict(self._last))

    def set_cycle(self, cycle: Cycle) -> None:
        """Take `cycle` (from the device directory) as the rule's state besides recency; the resident keys were
        inserted through the rule first, least recently used first."""
        self._current, self._layers, self._visits = cycle.current, cycle.layers, dict(cycle.visits)
        for key in self._last:
            self._last[key] = cycle.last[key]

    def score(self, key: ExpertKey) -> int:
        """Expected layer calls until `key` is needed (larger: evicted first)."""
        n = max(self._layers, 1)
        layer = key[0]
        distance = (layer - self._current - 1) % n + 1 if self._current >= 0 else n
        missed = max(self._visits.get(layer, 0) - self._last.get(key, 0), 0)
        return distance + n * missed

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        allowed = membership(candidates)
        best: tuple[int, int] | None = None
        chosen: ExpertKey | None = None
        for order in self._by_layer.values():
            for oldest in order:  # the layer's oldest evictable key is its most-missed one
                if oldest in allowed:
                    break
            else:
                continue
            rank = (self.score(oldest), -self._tick[oldest])
            if best is None or rank > best:
                best, chosen = rank, oldest
        if chosen is None:  # keys the rule never saw (not inserted through it): oldest first by default
            return next(iter(allowed))
        return chosen


@dataclass
class Cycle:
    """NextUse's state besides recency: the layer computing now (-1: none yet), the cycle length, how many times
    each layer has started, and for each resident key the visit of its layer that last used it."""

    current: int = -1
    layers: int = 0
    visits: dict[int, int] = field(default_factory=dict)
    last: dict[ExpertKey, int] = field(default_factory=dict)


EVICTION_RULES: dict[str, Callable[[], EvictionRule]] = {
    "lru": LRU, "lfu": LFU, "lfu-decay": DecayedLFU, "fifo": FIFO, "belady": Belady,
    "prior-frequency": PriorFrequency, "next-use": NextUse,
}


def make_rule(name: str) -> EvictionRule:
    """A new rule of the kind registered as `name`; one from another package is checked to be a rule."""
    try:
        factory = EVICTION_RULES[name]
    except KeyError:
        raise ValueError(f"unknown eviction rule {name!r}; choose one of {sorted(EVICTION_RULES)}") from None
    return built_rule(name, factory)
