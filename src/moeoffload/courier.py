"""Courier: a host thread that carries the device directory's fills to the copy engine.

Why: with the cache's directory on the device (`moeoffload.directory`) a layer never syncs with the host, so the
host runs ahead of the GPU; but the SMs' own loads from host memory reach only about half the link's rate
(benchmarks/RESULTS.md). Here the decision stays on the device and the bytes move on the copy engine:

    main thread (compute stream)              courier thread (copy stream)
    resolve(layer, ids, seq)  -> fills, and flag = seq if nothing is to copy or in flight
    fills -> pinned ring[i]; event[i]
    [resolve(next layer, guess, seq + 1, prefetch=True); its fills -> ring[i + 1]; event[i + 1]]
    wait until flag >= seq  ------------.     event[i].synchronize(); read ring[i]
    the layer's grouped FFN             |     copy each missing expert into its slot
                                        '---  flag = seq (after the copies: a memory fence first)
                                              then ring[i + 1]: the prefetch's copies, under the FFN

Invariants: the main thread never waits for the GPU, it queues the wait (`kernels.streamops`). A layer without a
miss sets the flag from its own lookup kernel, unless a copy the courier owes (a prefetch's, into a slot this call
may read) is still in flight; then the courier writes it after that copy. The flag only grows: the kernel writes it
only when the courier owes nothing, and the courier writes in call order.

Lazy loading: CUDA loads a kernel at its first launch, and that load may wait for the whole context to go idle, so a
kernel first launched while the compute stream waits on the flag would wait for the courier too. The first call of
each (layer, routed pairs, prefetch or not) shape therefore waits on the host before its lookups and again once its
flag is passed; later calls of the shape run ahead.

Work before the wait: `fetch(..., wait=False)` leaves the wait to the caller (`wait`), which first runs what reads no
slot still being filled: the FFN over the slots whose copy has landed (`DeviceDirectory.landing`).

Blocking calls: while the compute stream waits on the flag, a host call that blocks in the driver (a copy to pageable
memory, `.cpu()`, `.item()`) can hold the courier's own `cudaMemcpyAsync` up, and each waits for the other. So the
host drains the courier (`drain`: every queued call's copies and flag issued) after a model's last MoE layer, after an
encoder-decoder's encoder, and before the cache's host view is read; between MoE layers a forward must not block.

The GIL: after each wake-up the courier needs the GIL back while the main thread may be launching. The main thread
spends a step mostly blocked (in the ring or the end-of-step drain), with the GIL free, and lowering the switch
interval did not speed a decode step up (benchmarks/RESULTS.md), so `SWITCH_INTERVAL_S` is None and the process's
interval is left alone. A number lowers it to at most that while any courier runs (restored when the last one closes,
unless changed meanwhile); `mixtral_e2e.py --gil-ab` measures both.

Safety: the flag is written even when the courier fails, and after a failure it is set far ahead so no queued wait can
hang the GPU; the main thread raises the failure at its next call. The ring's `depth` bounds how far the host runs
ahead (a full ring makes it wait for the courier, never for the GPU directly). On a CPU the same protocol runs with a
condition variable for the flag (the tests' way to exercise it); there every op is synchronous.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from .directory import DeviceDirectory
from .kernels import streamops

RING_DEPTH = 64  # layer calls the host may queue ahead of the courier: two decode steps of Mixtral's 32 layers
HOST_WAIT_S = 60.0  # on a CPU a lost signal raises instead of hanging (a CUDA stream cannot time out)
FAIL_OPEN = 1 << 30  # added to the flag after a failure: every wait of the next 2**30 calls passes
SWITCH_INTERVAL_S: float | None = None  # the GIL hand-over while a courier runs (module docstring, "The GIL")


class _SwitchInterval:
    """Lowers `sys.setswitchinterval` while at least one courier holds it and puts the old value back after the
    last one lets go, unless somebody else changed it in between."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: float | None = None
        self._ours: float | None = None

    def hold(self, interval: float | None) -> bool:
        if interval is None:
            return False
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, interval))
                self._ours = sys.getswitchinterval()  # as CPython stores it (whole microseconds)
            self._holders += 1
        return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._saved is not None:
                if sys.getswitchinterval() == self._ours:
                    sys.setswitchinterval(self._saved)
                self._saved = self._ours = None


_switch_interval = _SwitchInterval()


class _DeviceFlag:
    """The flag in device memory, waited on and written by stream memory operations."""

    def __init__(self, flag: torch.Tensor):
        self.flag = flag

    def wait(self, stream, seq: int) -> None:
        streamops.wait_value(stream, self.flag, seq)

    def write(self, stream, seq: int) -> None:
        streamops.write_value(stream, self.flag, seq)


class _HostFlag:
    """The same protocol on a CPU tensor: a wait blocks the caller until the flag reaches `seq`."""

    def __init__(self, flag: torch.Tensor):
        self.flag = flag
        self._changed = threading.Condition()

    def wait(self, stream, seq: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: streamops.reached(int(self.flag.item()), seq), HOST_WAIT_S):
                raise RuntimeError(f"moeoffload: the courier did not signal call {seq} within {HOST_WAIT_S} s")

    def write(self, stream, seq: int) -> None:
        with self._changed:
            self.flag.fill_(streamops.as_int32(seq))
            self._changed.notify_all()


class Courier:
    """Runs a directory's lookups and carries their fills into `pool` on a copy stream (module docstring).
    `slab(layer)` gives the layer's page-locked host slab; expert e is its e-th run of `directory.expert_numel`
    elements. One courier per cache; `close` stops its thread."""

    def __init__(self, directory: DeviceDirectory, pool: torch.Tensor, slab: Callable[[int], torch.Tensor],
                 depth: int = RING_DEPTH):
        self.directory, self.pool, self._slab = directory, pool, slab
        self._cuda = pool.device.type == "cuda"
        self.device = torch.device("cuda", pool.device.index if pool.device.index is not None
                                   else torch.cuda.current_device()) if self._cuda else pool.device
        self._ring = torch.zeros((depth, directory.fills.numel()), dtype=torch.int32, pin_memory=self._cuda)
        self._events = [torch.cuda.Event() if self._cuda else None for _ in range(depth)]
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._flag = _DeviceFlag(directory.flag) if self._cuda else _HostFlag(directory.flag)
        directory.flag.zero_()  # on the compute stream: after every wait queued before this courier
        directory.owed.zero_()
        directory.landing.zero_()
        self._unwaited: tuple[int, tuple[int, int, bool] | None] | None = None  # (seq, first shape) of `wait`
        self._seq = 0
        self._next = 0
        self._room = threading.Semaphore(depth)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._slabs: dict[int, torch.Tensor] = {}  # read by the courier thread only
        self._seen: set[tuple[int, int, bool]] = set()  # (layer, routed pairs, prefetch) served once: kernels loaded
        self._queued = self._handled = 0  # calls handed to the thread, calls it has finished with (see drain)
        self._handled_changed = threading.Condition()
        self.error: BaseException | None = None
        self.copies = 0  # experts carried, counted by the courier thread
        # calls this thread signalled, and the host seconds from reading each list to queueing its flag: sum, worst
        self.carried_calls, self.issue_s, self.issue_max_s = 0, 0.0, 0.0
        self._holds_switch = _switch_interval.hold(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="moeoffload-courier", daemon=True)
        self._thread.start()

    def fetch(self, layer: int, top_k_index: torch.Tensor,
              ahead: Callable[[], tuple[int, torch.Tensor] | None] | None = None, wait: bool = True) -> None:
        """Queue this call's lookup, hand its fills to the courier, and make the compute stream wait for them.
        `ahead` gives a prefetch, (next layer, its guessed ids [T, k] on the device) or None: its lookup and copies
        are queued right after this call's, before the wait, so they run while this layer computes. With
        `wait=False` the caller queues the wait itself (`wait`), after the work that reads no slot being filled."""
        if self.error is not None:
            raise RuntimeError(f"moeoffload: the courier of fetch='device' failed ({type(self.error).__name__}: "
                               f"{self.error}); outputs since then are not valid. Use fetch='host'") from self.error
        if not self._thread.is_alive():
            raise RuntimeError("moeoffload: this courier is closed (the cache was freed)")
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        shape = (layer, top_k_index.numel(), ahead is not None)
        first = shape not in self._seen  # see "Lazy loading" above: kernels load while no wait is pending
        if first and stream is not None:
            stream.synchronize()
        seq = self._lookup(layer, top_k_index, stream)
        guess = ahead() if ahead is not None else None
        if guess is not None:
            self._lookup(guess[0], guess[1], stream, prefetch=True)
        self._unwaited = (seq, shape if first else None)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Make the compute stream wait for the copies of the last `fetch` (and of every call before it). The first
        call of a shape then waits on the host too, so that the kernels launched after it load with no wait
        pending ("Lazy loading")."""
        if self._unwaited is None:
            return
        (seq, first), self._unwaited = self._unwaited, None
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        self._flag.wait(stream, seq)
        if first is not None:
            self._seen.add(first)
            if stream is not None:
                stream.synchronize()

    def _lookup(self, layer: int, top_k_index: torch.Tensor, stream, prefetch: bool = False) -> int:
        """Launch one lookup and pass its fill list to the thread through the ring; its sequence number."""
        self._seq = streamops.as_uint32(self._seq + 1)
        seq = self._seq
        self.directory.resolve(layer, top_k_index, seq, prefetch=prefetch)
        self._room.acquire()  # the ring entry's last reader is done with it
        i = self._next
        self._next = (i + 1) % len(self._events)
        self._ring[i].copy_(self.directory.fills, non_blocking=True)
        event = self._events[i]
        if event is not None:
            event.record(stream)
        self._queue.put((i, layer, seq))
        self._queued += 1
        return seq

    def drain(self) -> None:
        """Return once the thread has queued the copies and the flag of every call handed to it: from then on the GPU
        finishes all queued work without this host's help, so a blocking CUDA call cannot deadlock with it (see
        "Blocking calls" above). It waits until the GPU reaches the last call's lookup, not for the copies."""
        with self._handled_changed:
            self._handled_changed.wait_for(lambda: self._handled >= self._queued or not self._thread.is_alive())

    def fence(self) -> None:
        """Make the compute stream wait until every queued call's copies have landed (the last call's flag). After
        `drain`; the flag only grows, so its last value covers every copy before it, prefetches included."""
        if self._queued:
            self._flag.wait(torch.cuda.current_stream(self.device) if self._cuda else None, self._seq)

    def reset_stats(self) -> None:
        """Zero the counters (`ExpertCache.reset_stats`, which drains first, so the thread is not counting)."""
        self.drain()
        self.copies = self.carried_calls = 0
        self.issue_s = self.issue_max_s = 0.0

    def close(self) -> None:
        """Stop the thread once it has carried everything queued (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._holds_switch:
            self._holds_switch = False
            _switch_interval.release()

    # -- the courier thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._cuda:
                streamops.bind_context(self.device.index)
                torch.cuda.set_device(self.device)
        except BaseException as exc:  # noqa: BLE001 (every call then fails open, and the main thread raises)
            self.error = exc
        while True:
            item = self._queue.get()
            if item is None:
                return
            i, layer, seq = item
            fills: list[tuple[int, int]] = []
            signal = True
            try:
                if self.error is None:
                    fills, signal = self._read(i)
            except BaseException as exc:  # noqa: BLE001 (reported to the main thread at its next call)
                self.error = exc
            finally:
                self._room.release()
            if self.error is None and not signal:
                self._finished()
                continue  # the lookup kernel set the flag itself
            start = time.perf_counter()
            try:
                if self.error is None and fills:
                    self._carry(layer, fills)
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
            finally:
                self._signal(seq + FAIL_OPEN if self.error is not None else seq)
            took = time.perf_counter() - start
            self.carried_calls += 1
            self.issue_s += took
            self.issue_max_s = max(self.issue_max_s, took)
            self._finished()

    def _finished(self) -> None:
        with self._handled_changed:
            self._handled += 1
            self._handled_changed.notify_all()

    def _read(self, i: int) -> tuple[list[tuple[int, int]], bool]:
        """Ring entry i: its (expert, slot) fills, and whether this thread must write the call's flag."""
        event = self._events[i]
        if event is not None:
            event.synchronize()
        row = self._ring[i].tolist()
        n, e_count = row[0], self.directory.num_experts
        return list(zip(row[1 : 1 + n], row[1 + e_count : 1 + e_count + n])), bool(row[1 + 2 * e_count])

    def _carry(self, layer: int, fills: list[tuple[int, int]]) -> None:
        slab = self._slabs.get(layer)
        if slab is None:
            slab = self._slabs[layer] = self._slab(layer)
        numel = self.directory.expert_numel
        with torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext():
            for expert, slot in fills:
                self.pool[slot].copy_(slab[expert * numel : (expert + 1) * numel], non_blocking=True)
        self.copies += len(fills)

    def _signal(self, seq: int) -> None:
        try:
            self._flag.write(self._copy_stream, seq)
        except BaseException as exc:  # noqa: BLE001
            if self.error is None:
                self.error = exc
