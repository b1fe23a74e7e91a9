"""Which running requests share a decode step: the scheduler seam of the serving loop.

A scheduler partitions the pool of requests ready to decode into groups of at most `max_batch`; the loop runs
the groups one decode step each (a round), then plans again with whoever is ready then. Every request advances
one token per round whatever the grouping, so no grouping can starve a request. Two schedulers:
- `FirstCome`: groups in admission order (continuous batching as vLLM and transformers do it);
- `ExpertFlow`: groups requests whose next tokens are predicted to route alike (`moeoffload.scheduler`'s
  grouping on the routes ExpertFlow's path predictor gives each request's last token), so a step needs fewer
  distinct experts and copies fewer bytes.
Only who shares a step changes: each request's tokens are its own greedy tokens either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .. import scheduler as routing


@dataclass(frozen=True)
class SequenceView:
    """What a scheduler may read of a running request: its id, arrival, and tokens so far (prompt + generated)."""

    id: Hashable
    arrival: float
    tokens: tuple[int, ...]


@runtime_checkable
class Scheduler(Protocol):
    name: str

    def plan(self, pool: Sequence[SequenceView], max_batch: int) -> list[list[Hashable]]:
        """Groups of request ids: each id of `pool` exactly once, each group 1..max_batch ids."""
        ...


class FirstCome:
    """Groups in admission order: the baseline."""

    name = "first-come"

    def plan(self, pool: Sequence[SequenceView], max_batch: int) -> list[list[Hashable]]:
        ids = [s.id for s in pool]
        return [ids[i : i + max_batch] for i in range(0, len(ids), max_batch)]


class ExpertFlow:
    """ExpertFlow's route grouping: `predictor.next_routes` guesses the (layer, expert) pairs of each request's
    next token; `moeoffload.scheduler.group_by_route` groups similar routes (never more experts than first-come
    on the predicted routes)."""

    name = "expertflow"

    def __init__(self, predictor):
        if not hasattr(predictor, "next_routes"):
            raise TypeError(f"the ExpertFlow scheduler groups by predicted routes, but {type(predictor).__name__} "
                            "has no next_routes(); pass an ExpertFlowPredictor")
        self.predictor = predictor

    def plan(self, pool: Sequence[SequenceView], max_batch: int) -> list[list[Hashable]]:
        if len(pool) <= max_batch:
            return [[s.id for s in pool]] if pool else []
        routes = self.predictor.next_routes([s.tokens for s in pool])
        schedule = routing.group_by_route(routes, max_batch)
        return [[pool[i].id for i in batch] for batch in schedule.batches]


def for_handle(handle) -> Scheduler:
    """The scheduler an offloaded model's policy asks for: ExpertFlow when `policy.scheduler == "expertflow"`
    (with the predictor the policy runs on), else first-come."""
    policy = getattr(handle, "policy", None)
    kind = getattr(policy, "scheduler", None)
    if kind is None:
        return FirstCome()
    if kind != "expertflow":
        raise ValueError(f"policy {getattr(policy, 'name', '?')!r} asks for scheduler {kind!r}; the serving loop "
                         "knows 'expertflow'")
    return ExpertFlow(predictor_of(handle))


def predictor_of(handle):
    """The routing predictor an offloaded model runs ahead of its layers; ValueError naming the fix when none."""
    predictor = getattr(getattr(handle, "runahead", None), "predictor", None)
    if predictor is None:
        raise ValueError(f"policy {handle.policy.name!r} runs no predictor, and ExpertFlow's scheduling groups by "
                         "its predicted routes: offload with policy 'expertflow' and "
                         "predictor=moeoffload.predictors.prepare('expertflow', model, ...)")
    return predictor


def check_plan(plan, pool: Sequence[SequenceView], max_batch: int) -> list[list[Hashable]]:
    """The plan as lists, or ValueError naming what is wrong with it (a scheduler's bug, not the request's)."""
    groups = [list(g) for g in plan]
    expected = [s.id for s in pool]
    if Counter(i for g in groups for i in g) != Counter(expected):
        raise ValueError(f"the plan {groups!r} must use every ready request {expected!r} exactly once")
    if any(not 1 <= len(g) <= max_batch for g in groups):
        raise ValueError(f"the plan {groups!r} has a group outside 1..{max_batch} requests")
    return groups
