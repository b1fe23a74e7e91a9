"""Routing predictors on the GPU: per-layer precision / recall / hit rate, and the policy table.

For switch-base-8 (published size, synthetic seeded weights) and, when present, the trained Mixtral-architecture
checkpoint models/kjv-moe: record routing on training prompts (a seed other than the measured ones), train the
SiDA hash network and the frequency prior, score them and random guessing per layer on a held-out split, then
measure every predictive policy beside resident / on-demand / lru / lookahead through moebench's Session (which
prepares each policy untimed: trained predictors, or the exact trace for oracle and Belady).

    PYTHONPATH=src python benchmarks/predictors.py            # writes under $OUT (default bench-out/predictors)

Writes predictors_<model>.json (per-layer scores), policies.json (records) and summary.txt; prints the tables.
Synthetic weights route almost uniformly: predictor accuracy there is a floor, not the papers' setting.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "bench-out/predictors") / "predictors"
DEADLINE_S = float(os.environ.get("PREDICTORS_DEADLINE_S", 7 * 60))
POLICIES = ["on-demand", "lru", "lookahead", "frequency", "sida", "sida-data-aware", "oracle", "belady",
            "oracle-belady"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def switch_spec():
    from moebench.suite import ModelSpec
    from moebench.zoo import load_model

    def build(tier, dtype, device):
        return load_model("switch-base-8", source="synthetic", dtype=dtype, device=device)

    return ModelSpec("switch-base-8", build, "switch-base-8, published size, synthetic seeded weights")


def kjv_spec():
    from moebench.suite import ModelSpec
    from moebench.zoo import load_model, trained_path

    try:
        path = trained_path()
    except Exception:  # not trained yet: the switch model alone
        return None
    if not path.exists():
        return None

    def build(tier, dtype, device):
        return load_model(str(path), source="trained", dtype=dtype, device=device)

    return ModelSpec("kjv-moe", build, f"trained Mixtral-architecture checkpoint {path}")


def main() -> int:
    from moebench.measure import CaseFailed, CaseSkipped, Session
    from moebench.predictor_cmd import table, train_and_evaluate
    from moebench.suite import Suite
    from moebench.workload import Workload

    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [s for s in (switch_spec(), kjv_spec()) if s is not None]
    log(f"device {device}; models {[s.name for s in specs]}; out {OUT}")
    workload = Workload(batch_size=8, prompt_len=32, new_tokens=16, seed=0)
    summary_lines, records = [], []
    for spec in specs:
        if time.perf_counter() - start > DEADLINE_S:
            log(f"deadline reached; skipping {spec.name}")
            break
        suite = Suite(name="predictors", models=[spec], budgets=["25%", "50%"], workload=workload,
                      policies=["resident", *POLICIES], accuracy_limit=1.0,
                      dtypes={"quick": "bfloat16", "full": "bfloat16"})
        session = Session(suite, device=device, tier="full", rounds=2)
        model, source = session.model(spec.name)
        log(f"{spec.name}: {source}")
        train = Workload(batch_size=8, prompt_len=32, new_tokens=16, seed=7919)
        prompts = [train.prompts(model.config.vocab_size, round_index=r) for r in range(16)]
        t0 = time.perf_counter()
        results = train_and_evaluate(model, prompts, train.new_tokens, epochs=30, device=device,
                                     out=OUT / spec.name, show_progress=False)
        results["weights"] = source
        (OUT / f"predictors_{spec.name}.json").write_text(json.dumps(results, indent=1, default=str))
        text = table(results)
        log(f"{spec.name}: predictors trained and scored in {time.perf_counter() - t0:.0f}s\n{text}")
        summary_lines += [f"## {spec.name} ({source}): held-out per-layer scores", text, ""]
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
                f"{record.get('hit_rate', float('nan')):.3f}, agreement {record.get('token_agreement', 1):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
        (OUT / "policies.json").write_text(json.dumps(records, indent=1, default=str))
    from tabulate import tabulate

    rows = [[r["model"], r["policy"], r["budget"], "yes" if r.get("exact") else "no", r.get("tokens_per_s"),
             r.get("p50_ms"), r.get("hit_rate"), (r.get("h2d_bytes_per_round") or 0) / 2**20,
             (r.get("torch_peak_bytes") or 0) / 2**30, r.get("accuracy_drop")] for r in records]
    policy_table = tabulate(rows, headers=["model", "policy", "budget", "exact", "tok/s", "p50 ms", "hit rate",
                                           "H2D MiB/round", "GPU peak GiB", "acc. drop"], floatfmt=".3f")
    summary_lines += ["## policy table (2 timed rounds, batch 8, prompt 32, 16 new tokens, bf16)", policy_table]
    (OUT / "summary.txt").write_text("\n".join(summary_lines) + "\n")
    print("\n".join(summary_lines))
    log(f"done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
