"""DeviceDirectory: the expert cache's residency kept on the device, so that an offloaded layer never waits for the
host (`ExpertCache(fetch="device")`).

Why: a layer must know which experts its router chose before it can fetch the missing ones. With the directory on
the host that is one device->host sync per MoE layer, and the host's launches add to the copies instead of hiding
under them. Here the layer's own kernels do the host's part:

- `resolve` (one launch): look the routed experts up in the table, count hits, choose a victim for each miss, update
  the table, and list the (expert, slot) fills;
- the fills: the courier (`moeoffload.courier`) carries them to the copy engine. Where the driver lacks stream memory
  operations, `fill` (one launch) streams each missing expert from the page-locked host store (mapped into the
  device's address space, `kernels.hostmap`) with the SMs' own loads, at about half the copy engine's rate.

The host launches them and moves on; nothing it does depends on what they found. Its own view of the cache
(`ExpertCache`'s dict and LRU order, its statistics) is brought up to date only when somebody reads it
(`ExpertCache.to_host` through `read`: one sync) and written back before the device path runs again after the host
path did (`ExpertCache.to_device` through `load`).

Prefetch (`resolve(..., prefetch=True)`): a lookahead guess at the next layer, looked up right after a call's own
lookup; its copies run while the layer computes. A later call that hits a slot still being filled must wait for that
copy, so a call may set the courier's flag itself only once every copy the courier owes has landed (`owed`).

Eviction, LRU or next-use (`eviction.NextUse`): recency is one stamp per slot, `tick * experts + expert` for a call's
experts, its hits before any miss is placed, so victims and order are those of the host's cache (hits touched and
misses loaded in ascending expert order). Next-use adds per layer its visits, the layer computing now and the cycle
length (`cycle`), and per slot the visit of its layer that last used it (`last`); its score is the host rule's, ties
to the least recent stamp. Both rules make the host cache's choices, slot for slot (a property test).
"""

from __future__ import annotations

import torch

from .eviction import LRU, Cycle, NextUse
from .kernels import use_triton
from .kernels.streamops import as_int32, reached

FREE = -1  # the stamp of an empty slot: below every real stamp, so empty slots are filled first, lowest first
NO_KEY = -1
BIG = 1 << 62  # stamps of padding and of this call's experts while a victim is chosen
COUNTS = ("hits", "misses", "evictions", "prefetches", "prefetch_hits")  # `counts`, in order
FILL_BLOCK = 8192  # elements each program of `fill` copies per step
FILL_PROGRAMS_PER_SM = 4
EVICTIONS = {"lru": LRU, "next-use": NextUse}  # the rules the directory keeps on the device, by name
EMPTY_SCORE = 1 << 30  # next-use's score of an empty slot: above every real one, so empty slots are filled first


class DeviceDirectory:
    """Residency of every expert in device tensors (see the module docstring):

    - `table` int32 [layers, experts + 1]: the slot of each expert, -1 when not resident; the last column is
      `n_slots`, the "no expert" sentinel that `kernels.route_on_device` expects after the experts;
    - `owner` int32 [slots]: the key `layer * experts + expert` in each slot, -1 when empty;
    - `stamp` int64 [slots]: LRU order, FREE when empty; `clock` int64 [1]: the last call's tick;
    - `fresh` int32 [slots]: 1 where a prefetch brought the expert and no call has asked for it yet;
    - `counts` int64 [5]: hits, misses, evictions, prefetches, prefetch hits since the last pull;
    - `flag` and `owed` int32 [1]: the last call whose copies have landed, and the last one the courier must signal;
    - `landing` int32 [slots]: the call whose copy fills each slot (landed once `flag` reaches it);
    - next-use only: `visits` int32 [layers], `cycle` int32 [2] (the layer computing now, the cycle length) and
      `last` int32 [slots] (`eviction.Cycle`).
    """

    def __init__(self, num_layers: int, num_experts: int, n_slots: int, device: torch.device, expert_numel: int,
                 backend: str = "auto", eviction: str = "lru"):
        if eviction not in EVICTIONS:
            raise ValueError(f"the device directory evicts by {' or '.join(EVICTIONS)}, not {eviction!r}")
        self.eviction = eviction
        self.backend = backend  # "auto": Triton on CUDA; "triton" (also under TRITON_INTERPRET on a CPU); "torch"
        self.num_layers, self.num_experts, self.n_slots = num_layers, num_experts, n_slots
        self.device = device
        self.expert_numel = expert_numel
        self.stride = num_experts  # stamps of one call: tick * stride + expert, all distinct
        self.table = torch.full((num_layers, num_experts + 1), -1, dtype=torch.int32, device=device)
        self.table[:, num_experts] = n_slots
        self.owner = torch.full((n_slots,), NO_KEY, dtype=torch.int32, device=device)
        self.stamp = torch.full((n_slots,), FREE, dtype=torch.int64, device=device)
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)
        self.fresh = torch.zeros(n_slots, dtype=torch.int32, device=device)
        self.counts = torch.zeros(len(COUNTS), dtype=torch.int64, device=device)
        # the last call's fills, packed so that one copy hands them to the host: [count, experts..., slots..., signal]
        # (signal: the courier must write the flag for this call, even with nothing to copy)
        self.fills = torch.zeros(2 + 2 * num_experts, dtype=torch.int32, device=device)
        self.fill_count = self.fills[:1]
        self.fill_experts = self.fills[1 : 1 + num_experts]
        self.fill_slots = self.fills[1 + num_experts : 1 + 2 * num_experts]
        self.fill_signal = self.fills[1 + 2 * num_experts :]
        self.wanted = torch.zeros(1, dtype=torch.int32, device=device)  # distinct experts of the last own lookup
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)  # the courier's sequence flag (see resolve)
        self.owed = torch.zeros(1, dtype=torch.int32, device=device)
        self.landing = torch.zeros(n_slots, dtype=torch.int32, device=device)
        self.slot_ends = torch.arange(1, n_slots + 1, dtype=torch.int32, device=device)  # route_on_device's bounds
        self.visits = torch.zeros(num_layers, dtype=torch.int32, device=device)
        self.cycle = torch.tensor([-1, 0], dtype=torch.int32, device=device)
        self.last = torch.zeros(n_slots, dtype=torch.int32, device=device)
        self.fill_programs = 4
        if device.type == "cuda":
            self.fill_programs = torch.cuda.get_device_properties(device).multi_processor_count * FILL_PROGRAMS_PER_SM

    # -- host <-> device -------------------------------------------------------------------------------------------
    def load(self, slot_of: dict[tuple[int, int], int], lru_order: list[tuple[int, int]],
             fresh: set[tuple[int, int]] | frozenset = frozenset(), cycle: Cycle | None = None) -> None:
        """Write the host's view (key -> slot, keys least recently used first, keys prefetched and not yet asked
        for, and next-use's `cycle`) into the device tensors."""
        e_count = self.num_experts
        table = torch.full((self.num_layers, e_count + 1), -1, dtype=torch.int32)
        table[:, e_count] = self.n_slots
        owner = torch.full((self.n_slots,), NO_KEY, dtype=torch.int32)
        stamp = torch.full((self.n_slots,), FREE, dtype=torch.int64)
        unasked = torch.zeros(self.n_slots, dtype=torch.int32)
        for rank, key in enumerate(lru_order):
            slot = slot_of[key]
            table[key[0], key[1]] = slot
            owner[slot] = key[0] * e_count + key[1]
            stamp[slot] = rank
            unasked[slot] = int(key in fresh)
        self.table.copy_(table)
        self.owner.copy_(owner)
        self.stamp.copy_(stamp)
        self.fresh.copy_(unasked)
        self.landing.copy_(self.flag.expand(self.n_slots))  # the host's copies have landed (`ExpertCache.to_device`)
        self.clock.fill_(len(lru_order) // self.stride + 1)  # every new stamp above the ranks
        self.counts.zero_()
        if cycle is not None:
            self.visits.copy_(torch.tensor([cycle.visits.get(layer, 0) for layer in range(self.num_layers)],
                                           dtype=torch.int32))
            self.cycle.copy_(torch.tensor([cycle.current, cycle.layers], dtype=torch.int32))
            last = torch.zeros(self.n_slots, dtype=torch.int32)
            for key, slot in slot_of.items():
                last[slot] = cycle.last.get(key, 0)
            self.last.copy_(last)

    def read(self) -> tuple[dict[tuple[int, int], int], list[tuple[int, int]], dict[str, int], set[tuple[int, int]],
                            Cycle | None]:
        """(key -> slot, keys least recently used first, counts since the last read by name (`COUNTS`), keys
        prefetched and not yet asked for, next-use's `Cycle` or None under LRU): one sync. The counts restart from
        zero."""
        owner, stamp, counts = self.owner.tolist(), self.stamp.tolist(), self.counts.tolist()
        fresh = self.fresh.tolist()
        self.counts.zero_()
        e_count = self.num_experts
        resident = sorted((stamp[slot], slot) for slot, key in enumerate(owner) if key != NO_KEY)
        slot_of = {(owner[slot] // e_count, owner[slot] % e_count): slot for _, slot in resident}
        order = [(owner[slot] // e_count, owner[slot] % e_count) for _, slot in resident]
        unasked = {key for key, slot in slot_of.items() if fresh[slot]}
        cycle = None
        if self.eviction == "next-use":
            (current, layers), visits, last = self.cycle.tolist(), self.visits.tolist(), self.last.tolist()
            cycle = Cycle(current, layers, {layer: v for layer, v in enumerate(visits) if v},
                          {key: last[slot] for key, slot in slot_of.items()})
        return slot_of, order, dict(zip(COUNTS, counts)), unasked, cycle

    # -- the hot path: launched by a layer, never waited for --------------------------------------------------------
    def resolve(self, layer: int, top_k_index: torch.Tensor, seq: int | None = None, prefetch: bool = False) -> None:
        """Make every expert that `top_k_index` names resident in the table (ids outside 0..E-1 name none): hits
        are touched, misses get the least recently used slot that this call does not use, and are listed in
        `fills`. The caller guarantees that the call names at most `n_slots` distinct experts.

        `prefetch`: the next layer's guessed experts, right after a call's own lookup (the host cache's `prefetch`):
        hits are left as they are, misses are inserted as most recent without evicting the previous call's experts,
        and a miss that no slot can take ends the prefetch. With `seq` (the courier's), a call with nothing to copy
        sets `flag` to `seq` itself when no copy the courier owes is still in flight, else marks `fill_signal`
        (`kernels.triton_kernels.resolve_experts`). Under next-use a call's own lookup is also its layer's start
        (`NextUse.on_layer`), and victims are chosen by the host rule's score."""
        ids = top_k_index.reshape(-1)
        if use_triton(ids, self.backend):
            from .kernels import triton_kernels as tk

            block_p = max(16, 1 << (max(ids.numel(), 1) - 1).bit_length())
            block_s = max(16, 1 << (self.n_slots - 1).bit_length())
            tk.resolve_experts[(1,)](ids.contiguous(), ids.numel(), self.table, self.owner, self.stamp, self.fresh,
                                     self.landing, self.clock, self.counts, self.fill_experts, self.fill_slots,
                                     self.fill_count, self.fill_signal, self.wanted, layer, self.n_slots, self.flag,
                                     self.owed, as_int32(seq or 0), self.visits, self.cycle, self.last,
                                     E=self.num_experts, BLOCK_P=block_p, BLOCK_S=block_s, SIGNAL=seq is not None,
                                     PREFETCH=prefetch, PREFETCH_MARK=int(prefetch),
                                     NEXT_USE=self.eviction == "next-use")
            return
        self._resolve_torch(layer, ids, seq, prefetch)

    def fill(self, source: torch.Tensor, pool: torch.Tensor) -> None:
        """Copy each expert that `resolve` listed from `source` (the layer's slab: a device view of page-locked host
        memory on CUDA) into its pool slot. On CUDA the SMs' loads cross PCIe; an empty list costs one launch."""
        if use_triton(pool, self.backend):
            from .kernels import triton_kernels as tk

            tk.fill_slots[(self.fill_programs,)](source, pool, self.fill_experts, self.fill_slots, self.fill_count,
                                       numel=self.expert_numel, MAX_FILLS=self.num_experts,
                                       PROGRAMS=self.fill_programs, BLOCK=FILL_BLOCK)
            return
        n = int(self.fill_count.item())
        for expert, slot in zip(self.fill_experts[:n].tolist(), self.fill_slots[:n].tolist()):
            numel = self.expert_numel
            pool[slot].copy_(source[expert * numel : (expert + 1) * numel])

    def _resolve_torch(self, layer: int, ids: torch.Tensor, seq: int | None = None, prefetch: bool = False) -> None:
        """`resolve` in plain Python over the tensors (CPU; the reference the Triton kernel is tested against)."""
        e_count = self.num_experts
        wanted = sorted({i for i in ids.tolist() if 0 <= i < e_count})
        table, owner, stamp, fresh = self.table.tolist(), self.owner.tolist(), self.stamp.tolist(), self.fresh.tolist()
        tick = int(self.clock.item()) + 1
        base = tick * self.stride
        protect = base - self.stride if prefetch else base  # stamps from here up are not victims
        row = table[layer]
        counts = dict.fromkeys(COUNTS, 0)
        next_use = self.eviction == "next-use"
        visits, (current, span), last = self.visits.tolist(), self.cycle.tolist(), self.last.tolist()
        if prefetch:  # NextUse._touch: a key of a layer that has not started yet is meant for its next visit
            mark = visits[layer] + int(layer != current)
        else:  # NextUse.on_layer
            visits[layer] += 1
            mark, current, span = visits[layer], layer, max(span, layer + 1)
        kept = set()  # a prefetch's resident experts: not victims, not touched

        def rank(s: int) -> tuple[int, int, int, int]:
            """Smallest first: allowed, then highest next-use score (LRU: none), then least recent, then slot."""
            if stamp[s] >= protect or s in kept:
                return (1, 0, 0, s)
            return (0, -self._score(owner[s], last[s], visits, current, span) if next_use else 0, stamp[s], s)

        for e in wanted:  # hits first: none of this call's experts may become a victim
            slot = row[e]
            if slot < 0:
                continue
            if prefetch:
                kept.add(slot)
            else:
                stamp[slot] = base + e
                last[slot] = mark
                counts["hits"] += 1
                counts["prefetch_hits"] += fresh[slot]
                fresh[slot] = 0
        fills = []
        if not prefetch or int(self.wanted.item()) > 0:
            for e in (e for e in wanted if row[e] < 0):
                victim = min(range(self.n_slots), key=rank)
                if stamp[victim] >= protect or victim in kept:
                    break  # only a prefetch can find every slot taken
                old = owner[victim]
                if old != NO_KEY:
                    table[old // e_count][old % e_count] = -1
                    counts["evictions"] += 1
                owner[victim] = layer * e_count + e
                row[e] = victim
                stamp[victim] = base + e
                fresh[victim] = int(prefetch)
                last[victim] = mark
                span = max(span, layer + 1)
                fills.append((e, victim))
                counts["prefetches" if prefetch else "misses"] += 1
        self.table.copy_(torch.tensor(table, dtype=torch.int32))
        self.owner.copy_(torch.tensor(owner, dtype=torch.int32))
        self.stamp.copy_(torch.tensor(stamp, dtype=torch.int64))
        self.fresh.copy_(torch.tensor(fresh, dtype=torch.int32))
        if next_use:
            self.visits.copy_(torch.tensor(visits, dtype=torch.int32))
            self.cycle.copy_(torch.tensor([current, span], dtype=torch.int32))
            self.last.copy_(torch.tensor(last, dtype=torch.int32))
        self.clock.fill_(tick)
        self.counts += torch.tensor([counts[name] for name in COUNTS], dtype=torch.int64, device=self.counts.device)
        self.fill_count.fill_(len(fills))
        for j, (e, slot) in enumerate(fills):
            self.fill_experts[j] = e
            self.fill_slots[j] = slot
            if seq is not None:
                self.landing[slot] = as_int32(seq)
        if not prefetch:
            self.wanted.fill_(len(wanted))
        if seq is not None:
            if not fills and reached(int(self.flag.item()), int(self.owed.item())):
                self.flag.fill_(as_int32(seq))
                self.fill_signal.fill_(0)
            else:
                self.owed.fill_(as_int32(seq))
                self.fill_signal.fill_(1)

    def _score(self, owner: int, last: int, visits: list[int], current: int, span: int) -> int:
        """NextUse.score of the expert `owner` (layer * E + expert) whose layer last used it at visit `last`; an
        empty slot scores above every expert."""
        if owner == NO_KEY:
            return EMPTY_SCORE
        n, layer = max(span, 1), owner // self.num_experts
        distance = (layer - current - 1) % n + 1 if current >= 0 else n
        return distance + n * max(visits[layer] - last, 0)
