"""ExpertFlow on the GPU: path-predictor accuracy, experts activated per batch (scheduled vs first-come), and the
policy table (throughput, latency, hit rate) of expertflow beside on-demand / lru / lookahead.

For switch-base-8 (published size, synthetic seeded weights) and, when present, the trained Mixtral-architecture
checkpoint models/kjv-moe:
1. record routing on training prompts (a seed other than the measured ones), train the path predictor, score it
   and random guessing on a held-out split (per-layer precision / recall / hit rate, pooled here);
2. on the held-out sequences, experts activated per batch for batch sizes 2/4/8: first-come, scheduled from the
   predicted routes (scored on the real routes), and scheduled from the real routes (the bound);
3. a moebench Session (bf16, batch 4, prompt 32, 16 new tokens, 4 rounds: a pool of 16 sequences the scheduling
   policy regroups) over resident, on-demand, lru, lookahead, expertflow and expertflow-fc (the same predictor and
   correction, first-come batches: the scheduling's own effect), budgets 25% and 50%.

    PYTHONPATH=src python benchmarks/expertflow.py          # writes under $OUT/expertflow (default bench-out)
    EXPERTFLOW_TINY=1 PYTHONPATH=src:. python benchmarks/expertflow.py   # CPU smoke run on the tests' tiny model

Writes predictor_<model>.json, schedule_<model>.json, policies.json, summary.txt; prints the tables last.
Synthetic weights route almost uniformly: predictor accuracy and scheduling gains there are a floor.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "bench-out") / "expertflow"
DEADLINE_S = float(os.environ.get("EXPERTFLOW_DEADLINE_S", 4.5 * 60))
TINY = os.environ.get("EXPERTFLOW_TINY") == "1"
POLICIES = ["on-demand", "lru", "lookahead", "expertflow", "expertflow-fc"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def specs():
    from moebench.suite import ModelSpec

    if TINY:
        from tests.moeoffload.models import tiny_mixtral

        return [ModelSpec("tiny-mixtral", lambda tier, dtype, device: (tiny_mixtral(seed=1).to(dtype), "tiny"))]
    from moebench.zoo import load_model, trained_path

    out = [ModelSpec("switch-base-8", lambda tier, dtype, device: load_model(
        "switch-base-8", source="synthetic", dtype=dtype, device=device), "switch-base-8, synthetic weights")]
    try:
        path = trained_path()
        out.append(ModelSpec("kjv-moe", lambda tier, dtype, device: load_model(
            str(path), source="trained", dtype=dtype, device=device), f"trained checkpoint {path}"))
    except Exception:
        pass
    order = os.environ.get("EXPERTFLOW_MODELS")  # e.g. "kjv-moe,switch-base-8": which models, in this order
    if order:
        by_name = {spec.name: spec for spec in out}
        out = [by_name[name] for name in order.split(",") if name in by_name]
    return out


def actual_routes(trace) -> torch.Tensor:
    """bool [sequences, layers, E]: the experts each held-out sequence's routers chose (all its stacks)."""
    E, rows = trace.num_experts, []
    for chunk in trace.chunks:
        b = chunk["tokens"].shape[0]
        if chunk["stack"] == 0:
            rows.append(torch.zeros(b, trace.num_layers, E + 1, dtype=torch.bool))
        for layer, rec in chunk["layers"].items():
            ids = rec["ids"].long()
            ids = torch.where((ids >= 0) & (ids < E), ids, E).view(b, -1)
            rows[-1][torch.arange(b).unsqueeze(1).expand_as(ids), layer, ids] = True
    return torch.cat(rows)[..., :E]


def predictor_part(model, source, name, device, summary):
    from moebench.workload import Workload
    from moeoffload import predictors as P
    from moeoffload.scheduler import compare, group_by_route

    train_wl = Workload(batch_size=8, prompt_len=32, new_tokens=16, seed=7919)
    prompts = [train_wl.prompts(model.config.vocab_size, round_index=r) for r in range(4 if TINY else 16)]
    t0 = time.perf_counter()
    trace = P.collect_trace(model, prompts, train_wl.new_tokens, device=device, show_progress=False)
    train, held = trace.split(0.25)
    t1 = time.perf_counter()
    predictor = P.ExpertFlowPredictor.train(train, steps=100 if TINY else 400, device=device, show_progress=False)
    t2 = time.perf_counter()
    ours = P.summary(P.evaluate(predictor, held))
    chance = P.summary(P.evaluate(P.RandomPredictor(held.num_experts, held.top_k), held))
    scores = {"weights": str(source), "trace_s": t1 - t0, "train_s": t2 - t1, "expertflow": ours, "random": chance,
              "per_layer": P.evaluate(predictor, held)}
    (OUT / f"predictor_{name}.json").write_text(json.dumps(scores, indent=1, default=str))
    summary.append(f"## {name} ({source}): held-out routing, pooled over layers\n"
                   f"expertflow {fmt(ours)}\nrandom     {fmt(chance)}\n"
                   f"(trace {t1 - t0:.0f}s, training {t2 - t1:.0f}s)\n")
    pool = torch.cat([c["tokens"] for c in held.chunks if c["stack"] == 0])
    real = actual_routes(held)
    predicted = predictor.routes(pool)
    rows = []
    for b in (2, 4, 8):
        from_prediction = compare(real, b, group_by_route(predicted, b))
        bound = compare(real, b)
        rows.append({"batch": b, "sequences": pool.shape[0], "first_come": bound.first_come,
                     "scheduled_from_prediction": from_prediction.scheduled, "scheduled_from_real_routes":
                     bound.scheduled, "predicted_first_come": compare(predicted, b).first_come})
    (OUT / f"schedule_{name}.json").write_text(json.dumps(rows, indent=1))
    from tabulate import tabulate

    summary.append(f"## {name}: distinct (layer, expert) pairs activated per batch, held-out sequences (real routes)\n"
                   + tabulate([[r["batch"], r["sequences"], r["first_come"], r["scheduled_from_prediction"],
                                r["scheduled_from_real_routes"]] for r in rows],
                              headers=["batch", "pool", "first-come", "scheduled (predicted)",
                                       "scheduled (real: bound)"], floatfmt=".1f") + "\n")


def fmt(s: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in s.items() if isinstance(v, float))


def main() -> int:
    import moeoffload
    from moebench.measure import CaseFailed, CaseSkipped, Session
    from moebench.suite import Suite
    from moebench.workload import Workload

    moeoffload.register_policy(moeoffload.Policy(
        "expertflow-fc", "ExpertFlow's predictor and correction with first-come batches (no token scheduling)",
        predictor="expertflow"), replace=True)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"device {device}; out {OUT}")
    workload = Workload(batch_size=4, prompt_len=32, new_tokens=16, seed=0)
    summary, records = [], []
    for spec in specs():
        if time.perf_counter() - start > DEADLINE_S:
            log(f"deadline reached; skipping {spec.name}")
            break
        dtype = "float32" if TINY else "bfloat16"
        suite = Suite(name="expertflow", models=[spec], budgets=["25%", "50%"], workload=workload,
                      policies=["resident", *POLICIES], accuracy_limit=0.0, dtypes={"quick": dtype, "full": dtype})
        session = Session(suite, device=device, tier="full", rounds=4)
        model, source = session.model(spec.name)
        predictor_part(model, source, spec.name, device, summary)
        log(summary[-2] + summary[-1])
        for case in suite.cases():
            if time.perf_counter() - start > DEADLINE_S:
                log("deadline reached; stopping the policy table")
                break
            t0 = time.perf_counter()
            try:
                record = session.run(case)
            except CaseFailed as exc:
                record = exc.record
            except CaseSkipped as exc:
                log(f"skip {case.name}: {exc}")
                continue
            records.append(record)
            log(f"{case.name}: {record.get('tokens_per_s', float('nan')):.1f} tok/s, hit "
                f"{record.get('hit_rate', float('nan')):.3f}, passed {record.get('passed')} "
                f"({time.perf_counter() - t0:.0f}s)")
        (OUT / "policies.json").write_text(json.dumps(records, indent=1, default=str))
    from tabulate import tabulate

    rows = [[r.get("model"), r.get("policy"), r.get("budget"), r.get("tokens_per_s"), r.get("p50_ms"),
             r.get("p99_ms"), r.get("hit_rate"), (r.get("h2d_bytes_per_round") or 0) / 2**20,
             r.get("experts_per_batch_first_come"), r.get("experts_per_batch_scheduled"), r.get("passed")]
            for r in records]
    summary.append(f"## policy table ({device}, {dtype}, 4 timed rounds, batch 4, prompt 32, 16 new tokens)\n"
                   + tabulate(rows, headers=["model", "policy", "budget", "tok/s", "p50 ms", "p99 ms", "hit rate",
                                             "H2D MiB/round", "experts/batch FC", "experts/batch sched", "passed"],
                              floatfmt=".3f"))
    (OUT / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    log(f"done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
