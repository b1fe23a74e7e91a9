"""Device confirmation of the regression verdict: repeated real runs of one suite case, unchanged and with an
injected slowdown (the inject-delay test hook), each compared with a baseline by moebench.stats.compare.

Usage (from the repo root, PYTHONPATH=src): python benchmarks/stats_device.py --out DIR [--tier full] [--rounds 20]
[--budget-s 200] [--slowdown 0.05]

One process, the model built once: a baseline run, a calibration run with a 1 ms delay per MoE layer call (to turn
"5% slower" into a delay: d = 1 ms * 0.05 * T / (T_1ms - T)), then as many unchanged and slowed runs as fit in the
time budget, alternating. Every run is stored in DIR/history (slowed ones labelled inject_delay_ms), so that
`benchmarks/stats_power.py --noise-from DIR/history` simulates with the measured noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tabulate import tabulate

from moebench import history
from moebench.measure import Session, resolve_device
from moebench.stats import compare
from moebench.suite import Case, load_suite

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--suite", type=Path, default=ROOT / "suites" / "switch" / "suite.py")
    ap.add_argument("--case", default="switch-base-8:lru:50%", help="model:policy:budget")
    ap.add_argument("--tier", default="full", choices=("quick", "full"))
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per run (both sides of each comparison)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="wall time for the repeated runs")
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

    def run(delay_s: float, kind: str) -> dict:
        session.inject_delay_s = delay_s
        t0 = time.perf_counter()
        rec = session.run(case)
        rec["stats_device_kind"] = kind
        history.append(hist, history.make_run([rec], [suite.name], ROOT, {"tier": args.tier, "rounds": args.rounds},
                                              command="benchmarks/stats_device.py"))
        median = statistics.median(rec["samples"]["round_s"])
        print(f"  {kind:10s} delay {delay_s * 1e3:.4f} ms: median round {median:.4f} s, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        return rec

    print(f"stats_device: {case.name}, tier {args.tier}, {args.rounds} rounds per run, device {session.device}")
    run(0.0, "warm-up")  # builds the model and the reference; not compared
    base = run(0.0, "baseline")
    t_base = statistics.median(base["samples"]["round_s"])
    cal = run(1e-3, "calibrate")
    t_cal = statistics.median(cal["samples"]["round_s"])
    per_ms = t_cal - t_base  # seconds added per round by 1 ms per MoE layer call
    if per_ms <= 0:
        print("calibration failed: a 1 ms delay per MoE layer did not slow the round; is the case offloaded?")
        return 1
    delay = 1e-3 * args.slowdown * t_base / per_ms
    t_run = (time.perf_counter() - t_start) / 4  # rough cost of one run, model build amortized
    left = args.budget_s - (time.perf_counter() - t_start)
    pairs = max(1, min(args.max_runs, int(left / (2 * t_run))))
    print(f"delay for {args.slowdown:.0%}: {delay * 1e3:.4f} ms per MoE layer call; {pairs} unchanged + {pairs} slowed"
          f" runs of ~{t_run:.1f} s")
    results = []
    for i in range(pairs):
        for kind, d in (("unchanged", 0.0), ("slowed", delay)):
            rec = run(d, kind)
            v = compare(base["samples"]["tokens_per_s"], rec["samples"]["tokens_per_s"], higher_is_better=True,
                        threshold=args.threshold)
            results.append({"kind": kind, "i": i, "delay_ms": d * 1e3, "ratio": v.ratio, "ci": [v.ci_low, v.ci_high],
                            "p_value": v.p_value, "status": v.status, "message": v.message})
    un = [r for r in results if r["kind"] == "unchanged"]
    sl = [r for r in results if r["kind"] == "slowed"]
    summary = {
        "case": case.name, "tier": args.tier, "rounds": args.rounds, "device": session.device,
        "baseline_median_round_s": t_base, "delay_ms": delay * 1e3, "target_slowdown": args.slowdown,
        "realized_slowdown_median": 1 - statistics.median(r["ratio"] for r in sl),
        "unchanged_runs": len(un), "false_alarms": sum(r["status"] == "regressed" for r in un),
        "slowed_runs": len(sl), "detected": sum(r["status"] == "regressed" for r in sl),
        "round_cv_baseline": statistics.pstdev(base["samples"]["tokens_per_s"]) /
        statistics.mean(base["samples"]["tokens_per_s"]),
        "wall_s": time.perf_counter() - t_start, "results": results,
    }
    (args.out / "stats_device.json").write_text(json.dumps(summary, indent=2))
    print(tabulate([[r["kind"], r["i"], f"{r['delay_ms']:.4f}", f"{r['ratio']:.4f}",
                     f"{r['ci'][0]:.3f}-{r['ci'][1]:.3f}", f"{r['p_value']:.2g}", r["status"]] for r in results],
                   headers=["run", "#", "delay ms", "ratio", "99% CI", "MW p", "verdict"], tablefmt="github"))
    print(f"\nSUMMARY {case.name} tier {args.tier}, {args.rounds} rounds/run: unchanged {summary['false_alarms']}/"
          f"{len(un)} flagged (want 0); slowed by {summary['realized_slowdown_median']:.1%} (target "
          f"{args.slowdown:.0%}): {summary['detected']}/{len(sl)} flagged; baseline round CV "
          f"{summary['round_cv_baseline']:.2%}; {summary['wall_s']:.0f} s")
    (args.out / "delay_ms.txt").write_text(f"{delay * 1e3:.5f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
