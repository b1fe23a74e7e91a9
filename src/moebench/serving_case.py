"""A suite case under the throughput workload (`--moebench-workload throughput`): many requests at once.

The decode workload (`moebench.measure`) times one batch of prompts through `generate()`. This one serves a tier's
`ThroughputWorkload` through moeoffload's serving loop (continuous batching, chunked prefill, the policy's token
scheduler) for each case, `rounds` times, and records what a serving system is judged by: tokens/s over the whole
run, time to first token and time per output token (p50, p99), distinct experts per decode step, bytes copied per
generated token, and the I/O floor of the steps the run made (`throughput.run_figures`).

Judged here:
- an exact policy served first-come gives every request the resident model's served tokens, bit for bit (same
  plan, same batches: the serving loop's batching depends on the requests, never on timing, offline);
- a token-scheduling policy (`expertflow`) batches otherwise, so its agreement with the resident model is reported,
  and the same workload is also served first-come on its cache, so that the table says what the scheduling saved;
- an approximate policy's agreement is reported; its accuracy is judged by the decode workload's teacher-forced
  evaluation, which this workload does not repeat.
The workload is part of a record's identity (`workload.kind`): a throughput case is never compared with a decode
baseline (`baseline.comparability`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .measure import CaseFailed, CaseSkipped, cache_fields, release_device_memory
from .suite import REFERENCE_BUDGET, REFERENCE_POLICY, Case
from .throughput import ThroughputWorkload, run_figures, serve_workload

if TYPE_CHECKING:
    from .measure import Session

# Per tier: the quick tier finishes in seconds a case on two CPU cores, with eight times as many requests as a
# step takes, so that a scheduler has a choice (on the trained model, ExpertFlow's grouping moved 1-4% more bytes
# than first-come with two groups, and 6-8% fewer with eight). The full tier leans toward MoE-Gen's shape
# (512-token prompts, 256 new tokens) within a suite's time on one GPU.
WORKLOADS = {
    "quick": ThroughputWorkload(name="suite-quick", requests=32, prompt_tokens=16, new_tokens=16, max_batch=4,
                                prefill_chunk=16),
    "full": ThroughputWorkload(name="suite-full", requests=32, prompt_tokens=256, new_tokens=64, max_batch=16,
                               prefill_chunk=256),
}
KINDS = ("decode", "throughput")


def workload_identity(workload: ThroughputWorkload) -> dict:
    return {"kind": "throughput", **{k: v for k, v in asdict(workload).items() if k != "arrivals"}}


def run_case(session: Session, case: Case) -> dict:
    """Serve `case` under the tier's throughput workload; returns its record, raises CaseFailed or CaseSkipped."""
    model, weights = session.model(case.model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise CaseSkipped(f"{case.name}: the serving loop serves decoder-only models, and {case.model} is an "
                          "encoder-decoder; run it under --moebench-workload decode")
    workload = WORKLOADS[session.tier]
    reference = _reference(session, case.model, workload)
    record = reference if case.is_reference else _measure(session, case, workload)
    if not case.is_reference:
        _judge(record, reference)
    record["failures"] = failures = record.get("failures", [])
    record["passed"] = not failures
    if failures:
        raise CaseFailed(f"{case.name}: " + "; ".join(failures), record)
    return record


def _reference(session: Session, name: str, workload: ThroughputWorkload) -> dict:
    """The resident model's record under the workload (once per model): its served tokens are the reference."""
    refs = session.throughput_refs
    if name not in refs:
        record = _measure(session, Case(name, REFERENCE_POLICY, REFERENCE_BUDGET), workload)
        record.update(token_agreement=1.0, tokens_identical=True)
        refs[name] = record
    return dict(refs[name])


def _measure(session: Session, case: Case, workload: ThroughputWorkload) -> dict:
    import moeoffload

    model, weights = session.model(case.model)
    try:
        predictor = _prepare(session, case, model, workload)
        release_device_memory(session.device)
        handle = session.serve(model, case.policy, case.budget, predictor)
    except moeoffload.BudgetError as exc:
        raise CaseSkipped(f"{case.name}: {exc}") from None
    except BaseException:
        session.close()
        raise
    rounds = [serve_workload(model, workload) for _ in range(session.rounds)]
    run, stats = rounds[-1]
    record = _base_record(session, case, weights, workload, stats)
    record.update(run_figures(run, stats, workload, None))
    record["samples"] = {"tokens_per_s": [_summary(r, workload).tokens_per_s for r, _ in rounds]}
    record["tokens_per_s"] = _median(record["samples"]["tokens_per_s"])  # the rounds' median, as a decode case
    record["served_tokens"] = [list(r.tokens) for r in run.results]
    record["p50_ms"], record["p99_ms"] = record["tpot_p50_s"] * 1e3, record["tpot_p99_s"] * 1e3
    if handle.policy.scheduler is not None:
        record["first_come"] = _first_come(model, workload)
    return record


def _prepare(session: Session, case: Case, model, workload: ThroughputWorkload):
    """A predictive policy's predictor: trained as the decode workload trains it, or, for one that replays the exact
    routing (oracle, Belady), recorded from the very runs about to be timed (every round served once, untimed)."""
    import moeoffload
    from moeoffload import predictors

    policy = moeoffload.get_policy(case.policy)
    if predictors.needs(policy) != "exact-trace":
        return session.prepare(case, model, session.suite.workload_for(session.tier), [])
    session._serve_for_recording(model, case)

    def run() -> None:
        for _ in range(session.rounds):
            serve_workload(model, workload, scheduler="first-come")

    return predictors.prepare(policy, model, run=run, budget=case.budget, device=session.device,
                              show_progress=False, past_end="lru")


def _first_come(model, workload: ThroughputWorkload) -> dict:
    """The same workload served first-come on the scheduling policy's cache: what its scheduling changed."""
    run, stats = serve_workload(model, workload, scheduler="first-come")
    figures = run_figures(run, stats, workload, None)
    return {k: figures[k] for k in ("tokens_per_s", "experts_per_decode_step", "h2d_bytes_per_token", "hit_rate")}


def _judge(record: dict, reference: dict) -> None:
    """Token agreement with the resident model's served tokens; an exact policy served first-come must match."""
    ref, ours = reference.get("served_tokens") or [], record.get("served_tokens") or []
    pairs = [(a, b) for ra, rb in zip(ref, ours) for a, b in zip(ra, rb)]
    same_lengths = [len(a) for a in ref] == [len(b) for b in ours]
    record["token_agreement"] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    record["tokens_identical"] = same_lengths and all(a == b for a, b in pairs)
    failures = record.setdefault("failures", [])
    if record.get("exact") and record.get("scheduler") == "first-come" and not record["tokens_identical"]:
        differ = sum(a != b for a, b in zip(ref, ours)) + abs(len(ref) - len(ours))
        failures.append(f"exact policy served tokens that differ from the resident model's in {differ} of "
                        f"{len(ref)} requests")
    if record.get("failed"):
        failures.append(f"{record['failed']} requests failed: {record.get('failed_ids')}")


def _base_record(session: Session, case: Case, weights, workload: ThroughputWorkload, stats) -> dict[str, Any]:
    return {
        "suite": session.suite.name, "case": case.name, "model": case.model, "policy": case.policy,
        "budget": case.budget, "tier": session.tier, "device": session.device, "rounds": session.rounds,
        "dtype": str(session.dtype).replace("torch.", ""), "weights": str(weights),
        "workload": workload_identity(workload),
        "exact": stats.exact, "kernels": stats.kernels, "fetch": stats.fetch, "expert_bytes": stats.expert_bytes,
        "stats": stats.as_dict(),
        **cache_fields(stats, 1),  # per round: one serving of the workload, the last round's statistics
    }


def _summary(run, workload: ThroughputWorkload):
    from moeoffload.serving import summarize

    return summarize(run, workload.bound())


def _median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else float("nan")
