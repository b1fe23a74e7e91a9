"""The Triton kernels themselves; import this module only where `triton` imports (see kernels.available()).

All weights are read from the cache pool through an indirection table: a tile of rows knows the slot its expert
sits in, so one launch covers every active expert of a layer, wherever the cache put them. Accumulation is in
float32; each output is rounded to its dtype once. Slot offsets are 64-bit (a pool of Mixtral experts passes
2^31 elements after a dozen slots).
"""

from __future__ import annotations

import triton
import triton.language as tl

GATED_SILU = 0  # down(silu(x @ gate^T) * (x @ up^T)), gate and up concatenated as one [2I, H] matrix
DENSE_RELU = 1  # down(relu(x @ wi^T))
NO_ACT = 2  # plain grouped matmul: the down projection


@triton.jit
def gather_rows(src_ptr, index_ptr, dst_ptr, H, DIVISOR, BLOCK_H: tl.constexpr):
    """dst[r] = src[index[r] // DIVISOR]: the permutation of token rows into expert order (DIVISOR: top-k, when
    the index holds token-major pair positions)."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    src_row = tl.load(index_ptr + row).to(tl.int64) // DIVISOR
    offs = block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    values = tl.load(src_ptr + src_row * H + offs, mask=mask)
    tl.store(dst_ptr + row.to(tl.int64) * H + offs, values, mask=mask)


@triton.jit
def route_pairs(ids_ptr, slot_of_id_ptr, order_ptr, inverse_ptr, offs_ptr, tiles_ptr, landing_ptr, flag_ptr, S, n_ids,
                n_slots, BLOCK_S: tl.constexpr, BLOCK_SLOTS: tl.constexpr, TILE_M: tl.constexpr, TILES: tl.constexpr,
                SPLIT: tl.constexpr):
    """The routing of a few pairs in one launch (`routing.route_on_device`): pair p = t * K + k goes to slot
    slot_of_id[clamp(id, -1, E)] (-1 and E: the "no expert" sentinel, n_slots). Its row in a stable sort by slot
    is the number of pairs before it, `inverse[p]`, and `order[row] = p`; `offs[i]` counts the pairs in slots
    <= i. Every program writes its BLOCK_SLOTS offsets; the first also ranks the pairs, all against all, so
    BLOCK_S stays small (decode sizes). With TILES it also writes `grouped_linear`'s tile table, one entry per
    sorted row: a row that starts a run of TILE_M rows of one slot gets (row, the slot's end row, slot), every
    other row an empty tile (row, row, 0), so the FFN runs over the routed slots only, whatever the pool's size.
    With SPLIT two tables follow each other: the tiles of slots whose copy has landed (landing[slot], the call
    that fills it, reached by the courier's flag), and those of slots still being filled: the FFN of the first
    runs before the layer waits for its copies (`directory.DeviceDirectory.landing`)."""
    pid = tl.program_id(0)
    p = tl.arange(0, BLOCK_S)
    live = p < S
    ids = tl.load(ids_ptr + p, mask=live, other=0)
    ids = tl.minimum(tl.maximum(ids, -1), n_ids - 1)
    ids = tl.where(ids < 0, n_ids - 1, ids)
    slot = tl.load(slot_of_id_ptr + ids, mask=live, other=0)
    slot = tl.where(live, slot, n_slots + 1)  # padding lanes: after every pair, never counted
    i = pid * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    counted = (slot[None, :] <= i[:, None]) & live[None, :]
    tl.store(offs_ptr + i, tl.sum(counted.to(tl.int32), axis=1), mask=i < n_slots)
    if pid == 0:
        ahead = (slot[None, :] < slot[:, None]) | ((slot[None, :] == slot[:, None]) & (p[None, :] < p[:, None]))
        row = tl.sum((ahead & live[None, :]).to(tl.int32), axis=1)
        tl.store(inverse_ptr + p, row, mask=live)
        tl.store(order_ptr + row, p, mask=live)
        if TILES:
            first = tl.sum(((slot[None, :] < slot[:, None]) & live[None, :]).to(tl.int32), axis=1)
            end = tl.sum(((slot[None, :] <= slot[:, None]) & live[None, :]).to(tl.int32), axis=1)
            starts = ((row - first) % TILE_M == 0) & (slot >= 0) & (slot < n_slots)
            now = starts
            if SPLIT:
                landing = tl.load(landing_ptr + tl.where(starts, slot, 0), mask=live, other=0)
                landed = tl.load(flag_ptr, volatile=True)  # written by the copy stream: a stale value only defers
                ready = (landed - landing) >= 0  # int32 difference: sequence numbers wrap around
                now = starts & ready
                later = starts & (ready == 0)
                tl.store(tiles_ptr + 3 * S + row, row, mask=live)
                tl.store(tiles_ptr + 4 * S + row, tl.where(later, end, row), mask=live)
                tl.store(tiles_ptr + 5 * S + row, tl.where(later, slot, 0), mask=live)
            tl.store(tiles_ptr + row, row, mask=live)
            tl.store(tiles_ptr + S + row, tl.where(now, end, row), mask=live)
            tl.store(tiles_ptr + 2 * S + row, tl.where(now, slot, 0), mask=live)


@triton.jit
def combine_rows(y_ptr, inverse_ptr, weight_ptr, limit_ptr, out_ptr, T, H, stride_t, stride_k, K: tl.constexpr,
                 HAS_LIMIT: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[inverse[t * stride_t + k * stride_k]] in float32, one rounding. A pair contributes
    nothing when its row is -1 or, with HAS_LIMIT, at or past *limit_ptr (read on the device: no host sync).

    A gather per token instead of a scatter with atomics: deterministic, and each output written exactly once.
    """
    t = tl.program_id(0)
    block = tl.program_id(1)
    offs = block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    if HAS_LIMIT:
        limit = tl.load(limit_ptr)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(inverse_ptr + t * stride_t + k * stride_k)
        w = tl.load(weight_ptr + t * K + k).to(tl.float32)
        valid = row >= 0
        if HAS_LIMIT:
            valid = valid & (row < limit)
        w = tl.where(valid, w, 0.0)
        safe_row = tl.where(valid, row, 0).to(tl.int64)
        y = tl.load(y_ptr + safe_row * H + offs, mask=mask & valid, other=0.0)
        acc += y.to(tl.float32) * w
    tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_linear(x_ptr, pool_ptr, out_ptr, tile_ptr, n_tiles, slot_numel, w_offset, N, K: tl.constexpr,
                   ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows, n] = act(x[rows] @ W_slot[n]^T) for every tile of rows, W_slot = pool[slot, w_offset:] as [N', K].

    `tile_ptr` holds three int32 rows of length n_tiles: first row, end row (exclusive) and slot of each tile; a
    tile covers rows first..min(end, first + BLOCK_M), and one with first >= end returns at once.
    With ACT == GATED_SILU the weight has 2N rows (gate then up) and both products share the loads of x.
    K is a compile-time constant: one model has two values of it, and a constant loop bound unrolls and pipelines
    (it also keeps Triton's CPU interpreter working with numpy 2).
    """
    tile = tl.program_id(0)
    block_n = tl.program_id(1)
    row0 = tl.load(tile_ptr + tile)
    row_end = tl.load(tile_ptr + n_tiles + tile)
    if row0 >= row_end:  # an empty tile of a table built on the device (`route_pairs` with TILES): no rows
        return
    slot = tl.load(tile_ptr + 2 * n_tiles + tile).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = pool_ptr + slot * slot_numel + w_offset
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_base + cols[None, :].to(tl.int64) * K + ks[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc)
        if ACT == 0:
            w_up = tl.load(w_base + (cols[None, :] + N).to(tl.int64) * K + ks[:, None], mask=w_mask, other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
    if ACT == 0:
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 1:
        acc = tl.maximum(acc, 0.0)
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def stream_copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst[:n] = src[:n], grid-strided: with `src` a device view of page-locked host memory, the SMs' own loads
    stream it across PCIe (benchmarks/zero_copy.py measures them against the copy engine)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for first in range(start, n, step):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["seq"])
def resolve_experts(ids_ptr, P, table_ptr, owner_ptr, stamp_ptr, fresh_ptr, landing_ptr, clock_ptr, counts_ptr,
                    fill_e_ptr, fill_s_ptr, fill_n_ptr, fill_sig_ptr, wanted_ptr, layer, n_slots, flag_ptr, owed_ptr,
                    seq, visits_ptr, cycle_ptr, last_ptr, E: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_S: tl.constexpr, SIGNAL: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_MARK: tl.constexpr,
                    NEXT_USE: tl.constexpr):
    """One MoE layer call's cache lookup on the device (`moeoffload.directory`), one program: hits are stamped
    first (so none of the call's experts can be chosen as a victim), then each miss, in ascending expert order, takes
    the slot of least stamp, evicting its owner from the table, and is listed for the fills. Stamps are
    tick * E + expert: the order the host's LRU cache would give.

    PREFETCH (PREFETCH_MARK: 1 with it, else 0): the lookup of a prefetch for the next layer, queued right after a
    call's own lookup (the host cache's `prefetch`): resident experts are neither touched nor counted, only kept
    from eviction; missing ones are listed and inserted as most recent; the previous call's experts (the layer
    about to compute) are never victims; it stops at the first expert no slot can take, and does nothing after a
    call that named no expert.

    SIGNAL: the courier's flag (`moeoffload.courier`). A call with nothing to copy sets the flag to `seq` itself,
    so the compute stream need not wait for the host, but only when every copy the courier owes has landed
    (flag >= owed: a hit may be on a slot that an earlier prefetch is still filling). Otherwise the call becomes
    what the courier owes, and `fill_sig` tells the courier to write the flag after the copies queued so far. Each
    slot it lists gets `seq` in `landing`: the layer's FFN runs the slots whose copy has landed before its wait.

    NEXT_USE: victims by `eviction.NextUse` instead of LRU: the highest score (expected layer calls until the expert
    is needed: distance + cycle * missed visits of its layer), empty slots first, ties to the least recent stamp. A
    call's own lookup is its layer's start (`on_layer`); every expert it touches or loads gets the layer's visit
    (`last`), a prefetch's the next one unless it is for the layer computing now."""
    p = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + p, mask=p < P, other=-1)
    s = tl.arange(0, BLOCK_S)
    live = s < n_slots
    stamps = tl.load(stamp_ptr + s, mask=live, other=1 << 62)
    fresh = tl.load(fresh_ptr + s, mask=live, other=0)
    kept = tl.zeros([BLOCK_S], dtype=tl.int32)  # a prefetch's resident experts: not victims, not touched
    tick = tl.load(clock_ptr) + 1
    base = tick * E
    if PREFETCH:  # stamps from here up are not victims
        protect = base - E
        active = tl.load(wanted_ptr) > 0
    else:
        protect = base
        active = tl.load(wanted_ptr) >= 0  # always
    row = table_ptr + layer * (E + 1)  # E is a compile-time constant: one model has one, and its loops unroll
    if NEXT_USE:  # its state (an LRU lookup reads none of it); `visits` in memory changes only at the end, so the
        # loop's gathers read it as it was, with this layer's new count put in by hand
        current = tl.load(cycle_ptr)
        span = tl.load(cycle_ptr + 1)
        own_visits = tl.load(visits_ptr + layer)
        owners = tl.load(owner_ptr + s, mask=live, other=-1)
        last = tl.load(last_ptr + s, mask=live, other=0)
        if PREFETCH:
            mark = own_visits + (layer != current).to(tl.int32)
        else:
            own_visits += 1
            mark = own_visits
            current = layer
            span = tl.maximum(span, layer + 1)
    hits = tl.zeros((), dtype=tl.int64)
    prefetch_hits = tl.zeros((), dtype=tl.int64)
    wanted = tl.zeros((), dtype=tl.int32)
    for e in range(0, E):
        needed = tl.sum((ids == e).to(tl.int32), axis=0) > 0
        slot = tl.load(row + e)
        if needed & (slot >= 0):
            if PREFETCH:
                kept = tl.where(s == slot, 1, kept)
            else:
                stamps = tl.where(s == slot, base + e, stamps)
                if NEXT_USE:
                    last = tl.where(s == slot, mark, last)
                hits += 1
                prefetch_hits += tl.sum(tl.where(s == slot, fresh, 0), axis=0).to(tl.int64)
                fresh = tl.where(s == slot, 0, fresh)
        wanted += needed.to(tl.int32)
    misses = tl.zeros((), dtype=tl.int64)
    evictions = tl.zeros((), dtype=tl.int64)
    stopped = tl.zeros((), dtype=tl.int32)
    for e in range(0, E):
        needed = tl.sum((ids == e).to(tl.int32), axis=0) > 0
        slot = tl.load(row + e)
        if needed & (slot < 0) & active & (stopped == 0):
            excluded = (stamps >= protect) | (kept > 0)
            candidates = tl.where(excluded, 1 << 62, stamps)
            if tl.min(candidates, axis=0) >= (1 << 62):
                stopped += 1  # only a prefetch can find every slot taken (a call's own experts always fit)
            else:
                if NEXT_USE:
                    n = tl.maximum(span, 1)
                    of = tl.where(owners >= 0, owners // E, 0)
                    seen = tl.load(visits_ptr + of, mask=live & (owners >= 0), other=0)
                    seen = tl.where(of == layer, own_visits, seen)
                    # (both in -1..n-1: never a negative remainder; before any layer started every distance is n)
                    distance = tl.where(current >= 0, (of - current - 1 + n) % n + 1, n)
                    score = distance + n * tl.maximum(seen - last, 0)
                    score = tl.where(owners >= 0, score, 1 << 30)
                    score = tl.where(excluded, -1, score)
                    candidates = tl.where(score == tl.max(score, axis=0), candidates, 1 << 62)
                victim = tl.argmin(candidates, axis=0)
                old = tl.load(owner_ptr + victim)
                if old >= 0:
                    tl.store(table_ptr + (old // E) * (E + 1) + old % E, -1)
                    evictions += 1
                tl.store(owner_ptr + victim, layer * E + e)
                tl.store(row + e, victim.to(tl.int32))
                stamps = tl.where(s == victim, base + e, stamps)
                fresh = tl.where(s == victim, PREFETCH_MARK, fresh)
                if NEXT_USE:
                    owners = tl.where(s == victim, layer * E + e, owners)
                    last = tl.where(s == victim, mark, last)
                    span = tl.maximum(span, layer + 1)
                tl.store(fill_e_ptr + misses, e)
                tl.store(fill_s_ptr + misses, victim.to(tl.int32))
                if SIGNAL:
                    tl.store(landing_ptr + victim, seq)
                misses += 1
    tl.store(stamp_ptr + s, stamps, mask=live)
    tl.store(fresh_ptr + s, fresh, mask=live)
    if NEXT_USE:
        tl.store(last_ptr + s, last, mask=live)
        tl.store(cycle_ptr, current)
        tl.store(cycle_ptr + 1, span)
        if not PREFETCH:
            tl.store(visits_ptr + layer, own_visits)
    tl.store(clock_ptr, tick)
    tl.store(fill_n_ptr, misses.to(tl.int32))
    if not PREFETCH:
        tl.store(wanted_ptr, wanted)
    if SIGNAL:
        owed = tl.load(owed_ptr)
        landed = tl.load(flag_ptr, volatile=True)  # written by the copy stream: a stale value only defers
        if (misses == 0) & ((landed - owed) >= 0):  # int32 difference: sequence numbers wrap around
            tl.store(flag_ptr, seq)
            tl.store(fill_sig_ptr, 0)
        else:
            tl.store(owed_ptr, seq)
            tl.store(fill_sig_ptr, 1)
    if PREFETCH:
        tl.store(counts_ptr + 3, tl.load(counts_ptr + 3) + misses)
    else:
        tl.store(counts_ptr, tl.load(counts_ptr) + hits)
        tl.store(counts_ptr + 1, tl.load(counts_ptr + 1) + misses)
        tl.store(counts_ptr + 4, tl.load(counts_ptr + 4) + prefetch_hits)
    tl.store(counts_ptr + 2, tl.load(counts_ptr + 2) + evictions)


@triton.jit
def fill_slots(src_ptr, pool_ptr, fill_e_ptr, fill_s_ptr, fill_n_ptr, numel: tl.constexpr, MAX_FILLS: tl.constexpr,
               PROGRAMS: tl.constexpr, BLOCK: tl.constexpr):
    """pool[slot_j] = src[expert_j] for the fills `resolve_experts` listed (a launch with none returns at once).
    `src` is the layer's slab: on CUDA a device view of page-locked host memory, so these loads cross PCIe. Program
    p copies chunks p, p + PROGRAMS, ... of each expert: at any moment the programs read neighbouring memory. Loop
    bounds are compile-time constants (one model, one launch width; Triton's CPU interpreter needs them too)."""
    n = tl.load(fill_n_ptr)
    pid = tl.program_id(0).to(tl.int64)
    for j in range(0, MAX_FILLS):
        if j < n:
            src = src_ptr + tl.load(fill_e_ptr + j).to(tl.int64) * numel
            dst = pool_ptr + tl.load(fill_s_ptr + j).to(tl.int64) * numel
            for c in range(0, tl.cdiv(numel, PROGRAMS * BLOCK)):
                offs = (c * PROGRAMS + pid) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < numel
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
