"""Device confirmation of the regression verdict: repeated real runs of one suite case, unchanged and with an
injected 5% slowdown (the stretch test hook), each compared with a baseline run by moebench.stats.compare, on raw
tokens/s and on machine-normalized tokens/s (`moebench.probe`) side by side.

Usage (from the repo root, PYTHONPATH=src): python benchmarks/stats_device.py --out DIR [--tier full] [--rounds 20]
[--budget-s 300] [--slowdown 0.05]

One process, the model built once: a warm-up run (it also makes the resident reference), a baseline run, then
unchanged and slowed runs alternating for as long as the budget allows. The slowdown is `Session.inject_slowdown`:
every MoE layer call busy-waits that fraction of the time since the previous call, so a slowed run takes 5% longer
than it would have at the machine's speed of that moment (a fixed delay in ms cannot promise that on a drifting
machine). Every run is appended to DIR/history (slowed ones labelled inject_slowdown) in time order: what
`benchmarks/stats_power.py --noise-from DIR/history` resamples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate

from moebench import history
from moebench.measure import Session, resolve_device
from moebench.stats import compare
from moebench.suite import Case, load_suite

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"raw": "tokens_per_s", "normalized": "tokens_per_probe"}


def probe_tracking(records: list[dict]) -> dict:
    """How well each probe part follows the rounds: the correlation of log(round time) with log(probe time around
    it), over the unchanged runs, after removing each run's own mean (so it measures tracking within runs)."""
    out = {}
    for part in ("total_s", "python_s", "launch_s", "gemm_s", "copy_s"):
        xs, ys = [], []
        for r in records:
            s = r["samples"]
            probe = np.asarray(s["probe"][part])
            around = np.log((probe[:-1] + probe[1:]) / 2)
            rounds = np.log(np.asarray(s["round_s"]))
            xs.extend(around - around.mean())
            ys.extend(rounds - rounds.mean())
        if len(xs) > 2 and np.std(xs) > 0:
            out[part] = float(np.corrcoef(xs, ys)[0, 1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--suite", type=Path, default=ROOT / "suites" / "switch" / "suite.py")
    ap.add_argument("--case", default="switch-base-8:lru:50%", help="model:policy:budget")
    ap.add_argument("--tier", default="full", choices=("quick", "full"))
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per run (both sides of each comparison)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall time for the repeated runs")
    ap.add_argument("--max-runs", type=int, default=12, help="cap on unchanged and on slowed runs, each")
    ap.add_argument("--slowdown", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.05)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    hist = args.out / "history"
    model, policy, budget = args.case.split(":")
    case = Case(model, policy, budget)
    suite = load_suite(args.suite)
    session = Session(suite, device=resolve_device(None), tier=args.tier, rounds=args.rounds)

    def run(slowdown: float, kind: str) -> dict:
        session.inject_slowdown = slowdown
        t0 = time.perf_counter()
        rec = session.run(case)
        rec["stats_device_kind"] = kind
        history.append(hist, history.make_run([rec], [suite.name], ROOT, {"tier": args.tier, "rounds": args.rounds},
                                              command="benchmarks/stats_device.py"))
        s = rec["samples"]
        print(f"  {kind:10s} stretch {slowdown:.0%}: median round {statistics.median(s['round_s']):.4f} s, median "
              f"probe {statistics.median(s['probe']['total_s']) * 1e3:.2f} ms, {time.perf_counter() - t0:.1f} s",
              flush=True)
        return rec

    print(f"stats_device: {case.name}, tier {args.tier}, {args.rounds} rounds per run, device {session.device}")
    unchanged_recs = [run(0.0, "warm-up")]  # builds the model and the reference; not compared
    base = run(0.0, "baseline")
    unchanged_recs.append(base)
    t_run = (time.perf_counter() - t_start) / 3  # rough cost of one run, model build and reference amortized
    left = args.budget_s - (time.perf_counter() - t_start)
    pairs = max(1, min(args.max_runs, int(left / (2 * t_run))))
    print(f"{pairs} unchanged + {pairs} slowed ({args.slowdown:.0%} stretch) runs of ~{t_run:.1f} s")
    results = []
    for i in range(pairs):
        for kind, slow in (("unchanged", 0.0), ("slowed", args.slowdown)):
            rec = run(slow, kind)
            if kind == "unchanged":
                unchanged_recs.append(rec)
            row = {"kind": kind, "i": i, "slowdown": slow}
            for name, key in METRICS.items():
                v = compare(base["samples"][key], rec["samples"][key], higher_is_better=True,
                            threshold=args.threshold)
                row[name] = {"ratio": v.ratio, "ci": [v.ci_low, v.ci_high], "p_value": v.p_value,
                             "status": v.status, "message": v.message}
            results.append(row)
    tracking = probe_tracking(unchanged_recs)
    summary = {"case": case.name, "tier": args.tier, "rounds": args.rounds, "device": session.device,
               "target_slowdown": args.slowdown, "probe_tracking": tracking, "wall_s": time.perf_counter() - t_start,
               "results": results}
    for name in METRICS:
        un = [r[name] for r in results if r["kind"] == "unchanged"]
        sl = [r[name] for r in results if r["kind"] == "slowed"]
        summary[name] = {"unchanged_runs": len(un), "false_alarms": sum(r["status"] == "regressed" for r in un),
                         "slowed_runs": len(sl), "detected": sum(r["status"] == "regressed" for r in sl),
                         "slowed_ratio_median": statistics.median(r["ratio"] for r in sl),
                         "unchanged_ratio_range": [min(r["ratio"] for r in un), max(r["ratio"] for r in un)]}
    (args.out / "stats_device.json").write_text(json.dumps(summary, indent=2))
    table = [[r["kind"], r["i"], f"{r['slowdown']:.0%}",
              *(x for name in METRICS for x in (f"{r[name]['ratio']:.4f}", f"{r[name]['ci'][0]:.3f}-"
                                                 f"{r[name]['ci'][1]:.3f}", f"{r[name]['p_value']:.2g}",
                                                 r[name]["status"]))] for r in results]
    print(tabulate(table, headers=["run", "#", "stretch", "raw ratio", "raw 99% CI", "raw p", "raw verdict",
                                   "norm ratio", "norm 99% CI", "norm p", "norm verdict"], tablefmt="github"))
    print("\nprobe tracking (corr. of log round time with log probe time, within runs): "
          + ", ".join(f"{k} {v:+.2f}" for k, v in tracking.items()))
    for name in METRICS:
        s = summary[name]
        print(f"SUMMARY {name:10s} {case.name}, {args.rounds} rounds/run: unchanged {s['false_alarms']}/"
              f"{s['unchanged_runs']} flagged (want 0), ratios {s['unchanged_ratio_range'][0]:.3f}-"
              f"{s['unchanged_ratio_range'][1]:.3f}; slowed {args.slowdown:.0%}: {s['detected']}/{s['slowed_runs']} "
              f"flagged (want all), median ratio {s['slowed_ratio_median']:.3f}")
    print(f"({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
