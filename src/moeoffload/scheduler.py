"""Token scheduling (ExpertFlow): regroup pending sequences into batches that share experts.

Every expert a batch routes to must be on the device while that batch runs, so with experts offloaded a batch
that touches fewer distinct experts copies fewer bytes and computes fewer, fuller expert GEMMs. ExpertFlow's
scheduler takes the predicted routing path of each pending sequence (the experts each MoE layer will pick for
its tokens) and groups sequences with similar paths, so that each batch activates fewer experts than batching
in arrival order (first-come).

The unit is a sequence: in generation a sequence's tokens share a KV cache and cannot be split across batches
(for a prefill-only workload, pass one route per token and the same functions regroup tokens).

Exactness: only which sequences share a batch changes, and `Schedule.restore` puts outputs back in arrival order.
In exact arithmetic a sequence's output does not depend on its batch mates, and on a CPU in fp32 the tokens are
the same as first-come batching's (tested). In floating point on a GPU they may not be: an expert's GEMM sees
the tokens the whole batch routed to it, a GEMM of another height may take another kernel and summation order,
and in bf16 that flips greedy near-ties, in transformers' own forward as much as here. So a scheduling policy is
exact in the sense that matters for the engine: the offloaded model gives the tokens the unoffloaded model gives
when served the same batches (moebench checks it that way and reports agreement with first-come apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """Batches of sequence indices (into the pending pool, arrival order 0..n-1); each index exactly once."""

    batches: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        order = self.order
        if sorted(order) != list(range(len(order))):
            raise ValueError("a schedule must use every pending sequence exactly once")

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def order(self) -> tuple[int, ...]:
        """The pool's indices in the order the batches run them."""
        return tuple(i for batch in self.batches for i in batch)

    @property
    def inverse(self) -> tuple[int, ...]:
        """Position of each arrival index in `order`: `restore` uses it to undo the permutation."""
        inv = [0] * self.n
        for position, i in enumerate(self.order):
            inv[i] = position
        return tuple(inv)

    def split(self, pool: torch.Tensor) -> list[torch.Tensor]:
        """The pool's rows ([n, ...], arrival order) as one tensor per batch, in schedule order."""
        return [pool[list(batch)] for batch in self.batches]

    def restore(self, outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Outputs in schedule order (one tensor [n, ...], or one per batch) back in arrival order."""
        if not isinstance(outputs, torch.Tensor):
            outputs = torch.cat(list(outputs)) if len(outputs) else torch.empty(0)
        if outputs.shape[0] != self.n:
            raise ValueError(f"{outputs.shape[0]} outputs for a schedule of {self.n} sequences")
        return outputs[list(self.inverse)]


def first_come(n: int, batch_size: int) -> Schedule:
    """Arrival order, `batch_size` sequences a batch (the last one takes the rest): the baseline."""
    _check_batch_size(batch_size)
    return Schedule(tuple(tuple(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)))


def group_by_route(routes: torch.Tensor, batch_size: int) -> Schedule:
    """ExpertFlow's schedule: batches of similar predicted routes, never more activated experts than first-come.

    `routes` is a boolean [n, ...] tensor: row i marks the (layer, expert) pairs sequence i is predicted to use.
    Greedy grouping: the pending sequence with the widest route opens a batch (wide routes are the hardest to
    place), then the batch takes, one at a time, the pending sequence that adds the fewest experts not yet in it
    (ties: the one sharing the most, then the earliest arrival). Batch sizes are those of first-come batching.
    If the grouping does not activate fewer experts in total than first-come on these routes, first-come is
    returned: the schedule is guaranteed to be no worse on the routes it was given.
    """
    _check_batch_size(batch_size)
    masks = _bitmasks(routes)
    n = len(masks)
    baseline = first_come(n, batch_size)
    pending = list(range(n))
    batches = []
    for size in (len(b) for b in baseline.batches):
        seed = max(pending, key=lambda i: (masks[i].bit_count(), -i))
        pending.remove(seed)
        batch, union = [seed], masks[seed]
        while len(batch) < size:
            best = min(pending, key=lambda i: ((masks[i] & ~union).bit_count(), -(masks[i] & union).bit_count(), i))
            pending.remove(best)
            batch.append(best)
            union |= masks[best]
        batches.append(tuple(batch))
    grouped = Schedule(tuple(batches))
    if sum(_activated(grouped, masks)) < sum(_activated(baseline, masks)):
        return grouped
    return baseline


def experts_per_batch(schedule: Schedule, routes: torch.Tensor) -> list[int]:
    """Distinct (layer, expert) pairs each batch of `schedule` activates under `routes` ([n, ...] bool)."""
    masks = _bitmasks(routes)
    if len(masks) != schedule.n:
        raise ValueError(f"{len(masks)} routes for a schedule of {schedule.n} sequences")
    return _activated(schedule, masks)


@dataclass(frozen=True)
class ScheduleGain:
    """Mean experts activated per batch, first-come against ExpertFlow's grouping, on the same routes."""

    first_come: float
    scheduled: float
    batches: int

    @property
    def reduction(self) -> float:
        """Fraction of first-come's activated experts that the schedule avoids (0 when none activate)."""
        return 1.0 - self.scheduled / self.first_come if self.first_come else 0.0


def compare(routes: torch.Tensor, batch_size: int, schedule: Schedule | None = None) -> ScheduleGain:
    """Experts activated per batch by first-come batching and by `schedule` (default: `group_by_route` on
    `routes`). Pass the routes that really happened (a trace) to measure a schedule made from predictions."""
    baseline = first_come(routes.shape[0], batch_size)
    schedule = group_by_route(routes, batch_size) if schedule is None else schedule
    fc, sc = experts_per_batch(baseline, routes), experts_per_batch(schedule, routes)
    return ScheduleGain(sum(fc) / max(len(fc), 1), sum(sc) / max(len(sc), 1), len(fc))


def _activated(schedule: Schedule, masks: list[int]) -> list[int]:
    counts = []
    for batch in schedule.batches:
        union = 0
        for i in batch:
            union |= masks[i]
        counts.append(union.bit_count())
    return counts


def _bitmasks(routes: torch.Tensor) -> list[int]:
    """One Python int per row: bit j set when flattened route entry j is true (fast unions and counts)."""
    if not isinstance(routes, torch.Tensor) or routes.dim() < 1:
        raise TypeError("routes must be a boolean tensor [n_sequences, ...] of predicted (layer, expert) use")
    if routes.shape[0] == 0:
        return []
    flat = routes.reshape(routes.shape[0], -1).to(torch.bool).cpu().numpy()
    packed = np.packbits(flat, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


# -- the serving loop's side: a pending pool of batches, an offloaded model whose policy may schedule ------------
def plan(handle, batches: Sequence[torch.Tensor]) -> Schedule | None:
    """The order to serve a pool of pending batches ([B, S] token ids each, equal B) in: None (first-come) unless
    the handle's policy schedules (`Policy.scheduler == "expertflow"`); then the pool's sequences regrouped by the
    routes the policy's path predictor gives them. Serve `schedule.split(torch.cat(batches))`, then
    `schedule.restore(outputs)`."""
    if getattr(handle.policy, "scheduler", None) is None or not batches:
        return None
    predictor = getattr(getattr(handle, "runahead", None), "predictor", None)
    if predictor is None or not hasattr(predictor, "routes"):
        raise ValueError(f"policy {handle.policy.name!r} schedules tokens but its predictor "
                         f"{type(predictor).__name__} predicts no routes; use the 'expertflow' predictor")
    pool = torch.cat(list(batches))
    return group_by_route(predictor.routes(pool), batches[0].shape[0])


def served_gain(handle, schedule: Schedule, batch_size: int) -> ScheduleGain | None:
    """Experts activated per batch on the routes the routers really chose while `schedule` was served (the last
    `len(schedule.batches)` batches), against first-come batching of the same sequences. Both come from one run:
    a sequence's routing does not depend on its batch in exact arithmetic (see the module's note on floating
    point, where a near-tie may route otherwise). None when no routes were recorded."""
    runtime = getattr(handle, "runahead", None)
    if runtime is None or not hasattr(runtime, "served_routes") or len(runtime.batch_routes) < len(schedule.batches):
        return None
    routes = schedule.restore(runtime.served_routes(len(schedule.batches)))
    return compare(routes, batch_size, schedule)
