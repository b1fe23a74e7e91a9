"""ExpertCache: a fixed pool of device slots, sized by a byte budget, that owns expert residency.

Guarantees, tested as properties:
- the pool never holds more bytes than the budget (it is allocated once: n_slots * expert bytes <= budget);
- every expert handed out by `acquire` is resident, and stays resident until `release` (pinned);
- a pinned expert is never evicted; on CUDA a slot is not overwritten before the last kernel reading it ends.
Nobody else moves experts in or out: hits, misses and bytes are counted here and in the TransferEngine.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .contracts import checked_victim
from .courier import Courier
from .directory import EVICTIONS, DeviceDirectory
from .eviction import EvictionRule, NextUse
from .kernels import streamops
from .store import ExpertKey, ExpertStore
from .transfer import TransferEngine

FOLD_HITS_EVERY = 256  # resident fast-path calls whose hits are counted together (the offsets they keep alive)
FETCH_MODES = ("host", "device")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    peak_resident: int = 0  # most experts resident at once
    prefetches: int = 0  # experts copied ahead of a request (not counted as hits or misses)
    prefetch_hits: int = 0  # requests served by an expert that a prefetch brought in

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")


class Evictable:
    """The resident experts an eviction may take (unpinned, not protected), as a lazy view: a rule tests
    membership in O(1) or iterates only as far as it needs. Listing every resident expert on every miss cost
    O(slots) per eviction, which at OLMoE's 1024 experts dominated the cache's bookkeeping."""

    fast_membership = True

    def __init__(self, slot_of: dict[ExpertKey, int], pins: list[int], protect: set[ExpertKey] | frozenset):
        self._slot_of, self._pins, self._protect = slot_of, pins, protect

    def __contains__(self, key: object) -> bool:
        slot = self._slot_of.get(key)  # type: ignore[call-overload]
        return slot is not None and self._pins[slot] == 0 and key not in self._protect

    def __iter__(self):
        pins, protect = self._pins, self._protect
        return (k for k, s in self._slot_of.items() if pins[s] == 0 and k not in protect)

    def __bool__(self) -> bool:
        return next(iter(self), None) is not None


class CapacityError(RuntimeError):
    """More experts pinned at once than the cache has slots: a caller bug, never a budget problem."""


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        n_slots: int,
        device: torch.device | str,
        rule: EvictionRule,
        transfer: TransferEngine | None = None,
        retain: bool = True,
        fetch: str = "host",
    ):
        if n_slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        if fetch not in FETCH_MODES:
            raise ValueError(f"fetch={fetch!r} is unknown; use one of {', '.join(FETCH_MODES)}")
        self.store = store
        self.n_slots = n_slots
        self.device = torch.device(device)
        self.rule = rule
        self._on_layer = getattr(rule, "on_layer", None)  # optional hook; looked up once, called every layer
        self.retain = retain
        self.transfer = transfer or TransferEngine(self.device)
        self.pool = torch.empty((n_slots, store.layout.numel), dtype=store.layout.dtype, device=self.device)
        self._views = [store.layout.views(row) for row in self.pool]  # made once: the hot loop reads them per expert
        self._slot_of: dict[ExpertKey, int] = {}
        self._free: list[int] = list(range(n_slots - 1, -1, -1))
        self._pins = [0] * n_slots
        cuda = self.device.type == "cuda"
        self._ready: list[torch.cuda.Event | None] = [None] * n_slots  # copy into the slot finished
        self._released: list[torch.cuda.Event | None] = [None] * n_slots  # last reader of the slot finished
        self._cuda = cuda
        self._prefetched: set[ExpertKey] = set()  # brought in by prefetch, not yet requested
        self._demoted: set[ExpertKey] = set()  # evicted before any other key (a prefetch the router proved wrong)
        self._stats = CacheStats()
        self._deferred_hits: torch.Tensor | None = None  # counted on the device by resident fast paths
        self._pending_offsets: list[torch.Tensor] = []  # their grouped-GEMM offsets, not yet counted
        self._tables: dict[int, torch.Tensor] = {}  # layer -> slot of each expert, once resident for good
        # fetch="device": residency kept on the device (moeoffload.directory); `_holder` says whose view is current
        self.directory: DeviceDirectory | None = None
        self._holder = "host"
        self._sources: dict[int, torch.Tensor] = {}  # layer -> its slab as the fill kernel reads it
        # how fetch="device" moves bytes: "copy-engine" (a Courier thread queues the copies), "sm-loads" (the fill
        # kernel reads the mapped host store) or "cpu" (in-place copies on a CPU). Chosen here; tests may set it.
        self.mover = "cpu"
        self._courier: Courier | None = None
        self._courier_closer: weakref.finalize | None = None  # closes the courier if the cache is dropped unfreed
        if fetch == "device":
            if self.device.type == "cuda":
                self.mover = "copy-engine" if streamops.available(self.device) else "sm-loads"
            self._check_device_fetch(rule, retain)
            self.directory = DeviceDirectory(store.num_layers, store.num_experts, n_slots, self.device,
                                             store.layout.numel, eviction=rule.name)

    @property
    def stats(self) -> CacheStats:
        """Hits, misses and the rest; reading it folds in the hits that resident fast paths counted on the device
        (one device sync, when statistics are read, instead of one per layer call)."""
        self.to_host()
        self._fold_hits()
        if self._deferred_hits is not None:
            self._stats.hits += int(self._deferred_hits.item())
            self._deferred_hits = None
        return self._stats

    @stats.setter
    def stats(self, value: CacheStats) -> None:
        self._stats = value
        self._deferred_hits = None
        self._pending_offsets = []

    # -- what is resident ------------------------------------------------------------------------------------
    @property
    def pool_bytes(self) -> int:
        return self.n_slots * self.store.expert_bytes

    @property
    def resident_bytes(self) -> int:
        self.to_host()
        return len(self._slot_of) * self.store.expert_bytes

    def resident(self) -> set[ExpertKey]:
        self.to_host()
        return set(self._slot_of)

    def slot_of(self) -> dict[ExpertKey, int]:
        """Where each resident expert sits (a copy)."""
        self.to_host()
        return dict(self._slot_of)

    def holds(self, key: ExpertKey) -> bool:
        """True when `key` is resident (no copy of the residency made, unlike `resident()`)."""
        self.to_host()
        return key in self._slot_of

    def is_pinned(self, key: ExpertKey) -> bool:
        self.to_host()
        slot = self._slot_of.get(key)
        return slot is not None and self._pins[slot] > 0

    def weights(self, slot: int) -> dict[str, torch.Tensor]:
        """The matrices of the expert in `slot`, as views of the pool (the same dict every time: do not modify)."""
        return self._views[slot]

    # -- the hot path ------------------------------------------------------------------------------------------
    def acquire(self, keys: Sequence[ExpertKey]) -> list[int]:
        """Make `keys` resident and pin them; return their slots. Misses are copied from the store.

        On CUDA the current stream is made to wait for each copy, so kernels launched after this call see the
        weights. `len(set(keys))` must not exceed `n_slots`. Under fetch="device" a host-path call (a prefill) takes
        the directory's view first.
        """
        self.to_host()
        wanted = list(dict.fromkeys(keys))
        protect = set(wanted)  # a miss never evicts an expert this same call is about to use
        if len(wanted) > self.n_slots:
            raise CapacityError(f"{len(wanted)} experts requested at once but the cache has {self.n_slots} slots")
        slots: list[int] = []
        pinned_now: list[int] = []
        try:
            for key in wanted:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._stats.hits += 1
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        self._stats.prefetch_hits += 1
                    self._demoted.discard(key)
                    self.rule.on_access(key)
                else:
                    slot = self._load(key, protect)
                    self._stats.misses += 1
                self._pins[slot] += 1
                pinned_now.append(slot)
                slots.append(slot)
        except BaseException:
            for slot in pinned_now:
                self._pins[slot] -= 1
            raise
        self._wait_for_copies(slots)
        return slots

    def resident_table(self, layer: int, num_experts: int) -> torch.Tensor | None:
        """The slot of every expert of `layer` as a device tensor, when they are all resident for good: the cache
        holds every expert of the model (nothing can ever be evicted) and keeps what it loaded. Then a layer may
        route on the device without asking which experts are needed (no device-to-host sync) and read the weights
        through this table; None otherwise. Built once per layer; the current stream waits for the copies once."""
        if self.directory is not None:
            return None  # fetch="device" serves a budget below every expert (see moeoffload.directory)
        table = self._tables.get(layer)
        if table is not None:
            return table
        if not self.retain or self.n_slots < self.store.num_layers * self.store.num_experts:
            return None
        found = [self._slot_of.get((layer, e)) for e in range(num_experts)]
        slots = [s for s in found if s is not None]
        if len(slots) < num_experts:
            return None
        self._wait_for_copies(slots)
        table = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self._tables[layer] = table
        return table

    def count_hits(self, offs: torch.Tensor) -> None:
        """Count the requests a resident fast path served: one per slot that has rows in `offs` (its grouped GEMM's
        offsets, int32 on the device, one per slot of its window; reading them now would sync). Kept as they are
        and counted `FOLD_HITS_EVERY` calls at a time, so a layer call launches nothing for its statistics."""
        self._pending_offsets.append(offs)
        if len(self._pending_offsets) >= FOLD_HITS_EVERY:
            self._fold_hits()

    def _fold_hits(self) -> None:
        if not self._pending_offsets:
            return
        by_width: dict[int, list[torch.Tensor]] = {}  # layers may group over windows of different widths
        for offs in self._pending_offsets:
            by_width.setdefault(offs.numel(), []).append(offs)
        self._pending_offsets = []
        for group in by_width.values():
            ends = torch.stack(group)  # [calls, slots of the window]
            rows = torch.diff(ends, dim=1, prepend=ends.new_zeros((ends.shape[0], 1)))
            hits = (rows > 0).sum()
            self._deferred_hits = hits if self._deferred_hits is None else self._deferred_hits + hits

    def enter_layer(self, layer: int) -> None:
        """Tell the eviction rule which MoE layer starts computing (rules that model the layer cycle use it). Only
        for a call on the host path: under fetch="device" a call's lookup counts its layer's start itself."""
        if self._on_layer is not None:
            self.to_host()
            self._on_layer(layer)

    def release(self, keys: Iterable[ExpertKey]) -> None:
        """Unpin `keys`. On CUDA, record that the slot's readers were queued on the current stream: one event
        marks the point after which every slot released here may be overwritten."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        for key in dict.fromkeys(keys):
            slot = self._slot_of[key]
            if self._pins[slot] <= 0:
                raise RuntimeError(f"expert {key} released more often than acquired")
            self._pins[slot] -= 1
            if event is not None:
                self._released[slot] = event
            if not self.retain and self._pins[slot] == 0:
                self._drop(key)

    def preload(self, keys: Iterable[ExpertKey]) -> None:
        """Make `keys` resident without pinning (warm start, `resident` policy). Not counted as requests."""
        self.to_host()
        for key in keys:
            if key not in self._slot_of:
                self._load(key)

    def prefetch(self, keys: Iterable[ExpertKey]) -> int:
        """Start copying `keys` that are not resident, best effort; return how many copies were issued.

        Never evicts a pinned expert or another key of this call; stops when no slot can be freed. On CUDA the
        copies run on the transfer stream, overlapping whatever the compute stream does meanwhile.
        """
        self.to_host()
        asked = list(dict.fromkeys(keys))
        wanted = [k for k in asked if k not in self._slot_of]
        for key in wanted:
            self.store.buffer(key)  # a key outside the store raises here, before any slot changes hands
        protect = set(asked)  # those already resident too: evicting one to load another would be a miss later
        issued = 0
        for key in wanted:
            if not self._free and not self._evictable(protect):
                break
            self._load(key, protect)
            self._prefetched.add(key)
            issued += 1
        self._stats.prefetches += issued
        return issued

    def demote(self, keys: Iterable[ExpertKey]) -> int:
        """Make resident, unpinned `keys` the first to be evicted, ahead of the eviction rule's order, until they
        are used again (ExpertFlow's correction: an expert prefetched for a layer whose router did not pick it
        gives its slot to the experts that layer does need). Returns how many keys were demoted."""
        self.to_host()
        keys = [k for k in dict.fromkeys(keys) if k in self._slot_of and not self.is_pinned(k)]
        self._demoted.update(keys)
        return len(keys)

    # -- internals ---------------------------------------------------------------------------------------------
    def _load(self, key: ExpertKey, protect: set[ExpertKey] | frozenset = frozenset()) -> int:
        slot = self._free.pop() if self._free else self._evict_one(protect)
        self._ready[slot] = self.transfer.copy(self.store.buffer(key), self.pool[slot], after=self._released[slot])
        self._slot_of[key] = slot
        self.rule.on_insert(key)
        self._stats.peak_resident = max(self._stats.peak_resident, len(self._slot_of))
        return slot

    def _wait_for_copies(self, slots: Iterable[int]) -> None:
        """On CUDA, make the current stream wait until the copies into `slots` have landed (no host wait)."""
        if not self._cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            event = self._ready[slot]
            if event is not None:
                stream.wait_event(event)

    def _evictable(self, protect: set[ExpertKey] | frozenset = frozenset()) -> Evictable:
        return Evictable(self._slot_of, self._pins, protect)

    def _evict_one(self, protect: set[ExpertKey] | frozenset = frozenset()) -> int:
        candidates = self._evictable(protect)
        if not candidates:
            raise CapacityError("every cache slot is pinned; release experts before acquiring more")
        demoted = [k for k in self._demoted if k in candidates]
        self._drop(checked_victim(self.rule, demoted or candidates))
        self._stats.evictions += 1
        return self._free.pop()

    def _drop(self, key: ExpertKey) -> None:
        slot = self._slot_of.pop(key)
        self._tables.pop(key[0], None)
        self._prefetched.discard(key)
        self._demoted.discard(key)
        self.rule.on_remove(key)
        self._free.append(slot)

    def free(self) -> None:
        """Give the device pool back (after unload); statistics stay readable, the cache is unusable."""
        _ = self.stats  # fold in deferred hits (and the device directory's counts) while the device holds them
        if self._courier_closer is not None:
            self._courier_closer()  # closes the courier once, here or when the cache is collected
            self._courier = self._courier_closer = None
        self.directory = None
        self._sources.clear()
        self._slot_of.clear()
        self._tables.clear()
        self._views = []  # views hold the pool's storage
        self.pool = self.pool.new_empty(0)

    def reset_stats(self) -> None:
        self.to_host()
        self._stats = CacheStats(peak_resident=len(self._slot_of))
        self._deferred_hits = None
        self._pending_offsets = []
        self.transfer.reset_stats()
        if self._courier is not None:
            self._courier.reset_stats()

    @property
    def courier(self) -> Courier | None:
        """The thread carrying fetch="device"'s fills on the copy engine (its counters: copies, carried_calls,
        issue_s, issue_max_s), once the first device fetch started it; None otherwise."""
        return self._courier

    # -- fetch="device": the directory on the device -----------------------------------------------------------------
    def _check_device_fetch(self, rule: EvictionRule, retain: bool) -> None:
        """Refuse what the device directory cannot do, naming the fix."""
        if type(rule) is not EVICTIONS.get(getattr(rule, "name", "")) or not retain:
            raise ValueError(f"fetch='device' keeps an LRU or next-use cache on the device; this cache evicts by "
                             f"{getattr(rule, 'name', type(rule).__name__)!r}{'' if retain else ' without retaining'}: "
                             "use fetch='host', or a policy such as 'lru' or 'next-use'")
        if self.n_slots > _max_device_slots():
            raise ValueError(f"fetch='device' groups every slot in one grouped GEMM, which takes at most "
                             f"{_max_device_slots()}; this cache has {self.n_slots}: use fetch='host' or a smaller "
                             "budget")
        if self.device.type == "cuda":
            if not self.store.pinned:
                raise ValueError("fetch='device' streams experts from page-locked host memory, but this store is "
                                 "not pinned: build the ExpertStore with pin_memory=True, or use fetch='host'")
            if self.mover == "copy-engine":
                return
            try:
                self._source(0)  # the device address of a registered slab: refused here, not in the first forward
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"fetch='device' cannot map the host store into {self.device} ({exc}); use "
                                 "fetch='host'") from None

    def serves_on_device(self, distinct_bound: int) -> bool:
        """True when a layer call that names at most `distinct_bound` distinct experts can run on the device
        directory (every one of them fits in the pool at once); the caller takes the host path otherwise."""
        return self.directory is not None and distinct_bound <= self.n_slots

    def fetch_on_device(self, layer: int, top_k_index: torch.Tensor,
                        ahead: Callable[[], tuple[int, torch.Tensor] | None] | None = None,
                        wait: bool = True) -> torch.Tensor:
        """Launch this call's lookup and its fills without waiting for either; return the layer's row of the table
        (slot of each expert, then the "no expert" sentinel) for `kernels.route_on_device`. `ahead` gives a prefetch
        to queue right after (next layer, its guessed ids on the device), or None: `prefetch` on the device.
        `wait=False`: the compute stream waits for the copies only at `finish_fetch`, so that the caller can first
        run what reads no slot being filled (`landing_view`)."""
        assert self.directory is not None
        self.to_device()
        if self.mover == "copy-engine":
            if self._courier is None:
                self._courier = Courier(self.directory, self.pool, self.store.slab)
                # the courier's thread keeps the courier alive, so a cache dropped without free() would leave the
                # thread (and a lowered switch interval, if set) behind; the courier holds no reference to the cache
                self._courier_closer = weakref.finalize(self, self._courier.close)
                self._courier_closer.atexit = False  # at exit the daemon thread just stops
            self._courier.fetch(layer, top_k_index, ahead, wait)
        else:
            self.directory.resolve(layer, top_k_index)
            self.directory.fill(self._source(layer), self.pool)
            guess = ahead() if ahead is not None else None
            if guess is not None:  # after this call's fills, in stream order: no copy runs under the compute here
                self.directory.resolve(guess[0], guess[1], prefetch=True)
                self.directory.fill(self._source(guess[0]), self.pool)
        return self.directory.table[layer]

    def finish_fetch(self) -> None:
        """The compute stream waits for the last `fetch_on_device(..., wait=False)`'s copies (a no-op otherwise)."""
        if self._courier is not None:
            self._courier.wait()

    def landing_view(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(landing, flag) of the device directory, when copies may still be in flight after a lookup (the copy
        engine's courier): a slot's copy has landed once the flag reaches its landing sequence number. None when
        every fill is done in stream order before the next kernel (the SMs' loads, the CPU's in-place copies)."""
        if self.directory is None or self.mover != "copy-engine":
            return None
        return self.directory.landing, self.directory.flag

    def settle_device(self) -> None:
        """Wait (on the host) until the courier has issued every queued fill and flag (`Courier.drain`): after it a
        blocking CUDA call cannot deadlock with the compute stream's waits. A no-op without a courier."""
        if self._courier is not None:
            self._courier.drain()

    def _source(self, layer: int) -> torch.Tensor:
        found = self._sources.get(layer)
        if found is None:
            slab = self.store.slab(layer)
            if self.device.type == "cuda":
                from .kernels.hostmap import device_view

                slab = device_view(slab, self.device)
            found = self._sources[layer] = slab
        return found

    def to_device(self) -> None:
        """Make the device directory current (a no-op when it already is): the host's residency and LRU order go
        into it, and the device waits for the host's copies into any slot."""
        if self.directory is None or self._holder == "device":
            return
        if any(self._pins):
            raise RuntimeError("fetch='device' took over while experts were pinned; release them first")
        self._wait_for_copies(range(self.n_slots))
        order = [k for k in self.rule if k in self._slot_of]  # type: ignore[attr-defined]
        cycle = self.rule.cycle() if isinstance(self.rule, NextUse) else None
        self.directory.load(self._slot_of, order, self._prefetched, cycle)
        self._holder = "device"

    def to_host(self) -> None:
        """Make the host's view current (a no-op when it already is): one sync, then the device's residency, LRU
        order and counts replace the host's. The host's next copy into a slot waits for the kernels queued so far."""
        if self.directory is None or self._holder == "host":
            return
        self.settle_device()
        if self._courier is not None:
            self._courier.fence()  # a prefetch's copies are waited for by the call that reads them, not their own
        slot_of, order, counts, unasked, cycle = self.directory.read()
        for key in list(self._slot_of):
            self.rule.on_remove(key)
        for key in order:
            self.rule.on_insert(key)
        if cycle is not None:
            self.rule.set_cycle(cycle)  # type: ignore[attr-defined]
        self._slot_of = slot_of
        used = set(slot_of.values())
        self._free = [s for s in range(self.n_slots - 1, -1, -1) if s not in used]
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._released = [event] * self.n_slots
        self._ready = [None] * self.n_slots  # every fill is ordered before the compute stream's next work
        self._prefetched = unasked
        for name, count in counts.items():
            setattr(self._stats, name, getattr(self._stats, name) + count)
        self._stats.peak_resident = max(self._stats.peak_resident, len(slot_of))
        copies = counts["misses"] + counts["prefetches"]
        self.transfer.stats.copies += copies
        self.transfer.stats.bytes += copies * self.store.expert_bytes
        self._holder = "host"


class PrecisionCaches:
    """The expert caches of a low-precision policy: one ExpertCache per precision, each over its own store (the
    full-precision experts, or their quantized copies) and its own slots, in order of precision, most precise first.

    An expert may be resident in more than one precision at once (HOBBIT's upgrade: an expert first copied low and
    then needed at full precision). A request for an expert at least at precision `wanted` is served by the most
    precise resident copy that is at least as precise (a hit in that precision's cache); if there is none, `wanted`
    is copied (a miss in its cache). So every hit, miss and byte is counted by exactly one ExpertCache, and the
    bytes moved are each precision's misses times its expert bytes.
    """

    def __init__(self, caches: dict[str, ExpertCache]):
        if not caches:
            raise ValueError("PrecisionCaches needs at least one cache")
        self.caches = caches
        self.order = list(caches)  # most precise first
        self.upgrades = 0  # full-precision misses of an expert resident in a lower precision
        self._scratch: torch.Tensor | None = None

    def scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The one full-precision expert buffer where a quantized expert is dequantized on arrival, shared by every
        layer (they run one after another on one stream, which orders each write after the last read)."""
        if self._scratch is None or self._scratch.numel() != numel or self._scratch.dtype != dtype:
            device = next(iter(self.caches.values())).device
            self._scratch = torch.empty(numel, dtype=dtype, device=device)
        return self._scratch

    @property
    def scratch_bytes(self) -> int:
        return 0 if self._scratch is None else self._scratch.numel() * self._scratch.element_size()

    def serving(self, key: ExpertKey, wanted: str) -> str:
        """The precision that serves `key` when `wanted` is the least it may have: resident if one is."""
        at_least = self.order[: self.order.index(wanted) + 1]
        for precision in at_least:
            if self.caches[precision].holds(key):
                return precision
        return wanted

    def acquire(self, key: ExpertKey, wanted: str) -> tuple[str, int]:
        """(precision served, slot in that precision's cache), pinned until `release(key, precision)`."""
        precision = self.serving(key, wanted)
        cache = self.caches[precision]
        if not cache.holds(key) and any(self.caches[p].holds(key) for p in self.order):
            self.upgrades += 1
        return precision, cache.acquire([key])[0]

    def release(self, key: ExpertKey, precision: str) -> None:
        self.caches[precision].release([key])

    def resident(self) -> dict[str, set[ExpertKey]]:
        return {p: c.resident() for p, c in self.caches.items()}

    def reset_stats(self) -> None:
        self.upgrades = 0
        for cache in self.caches.values():
            cache.reset_stats()

    def free(self) -> None:
        self._scratch = None
        for cache in self.caches.values():
            cache.free()


def _max_device_slots() -> int:
    from .kernels import GROUPED_MM_MAX_GROUPS

    return GROUPED_MM_MAX_GROUPS
