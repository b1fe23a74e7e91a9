"""The papers' claims beside our measurements: GPU-memory saving and speed against `resident` and `on-demand`.

Reads policy records written by benchmarks/predictors.py or benchmarks/expertflow.py (moebench records: one per
case, with torch's peak allocated bytes, tokens/s, p50 step latency, accuracy drop) and prints, per model and
budget, each policy's memory saving against the resident run of the same file and its speed against resident and
against on-demand at the same budget. Computes from the files only; it measures nothing.

    python benchmarks/paper_claims.py benchmarks/results/h100-2026-11-23c/tests_predictors_expertflow/*policies.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# As the issue quotes them (../shared/seeds/ has the papers): what each one reports at its best.
CLAIMS = [
    ("SiDA-MoE (sida, sida-data-aware)", "up to 80%", "up to 3.93x throughput, 72% lower latency", "about 1%"),
    ("ExpertFlow (expertflow)", "up to 93.72%", "2-10x against offloading baselines", "none claimed (exact)"),
]


def rows(records: list[dict], source: str) -> list[list[str]]:
    out = []
    by_model: dict[str, list[dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        resident = next((r for r in recs if r["policy"] == "resident"), None)
        if resident is None or not resident.get("torch_peak_bytes"):
            continue
        on_demand = {r["budget"]: r for r in recs if r["policy"] == "on-demand"}
        for r in recs:
            if r["policy"] in ("resident", "on-demand") or not r.get("torch_peak_bytes"):
                continue
            od = on_demand.get(r["budget"])
            saving = 1 - r["torch_peak_bytes"] / resident["torch_peak_bytes"]
            drop = r.get("accuracy_drop")
            out.append([
                model, r["policy"], r["budget"], "yes" if r.get("exact") else "no", f"{saving:.1%}",
                f"{r['tokens_per_s'] / resident['tokens_per_s']:.2f}x",
                f"{r['tokens_per_s'] / od['tokens_per_s']:.2f}x" if od else "-",
                f"{1 - r['p50_ms'] / od['p50_ms']:+.0%}" if od and r.get("p50_ms") else "-",
                "-" if drop is None else f"{drop:.3f}", "yes" if r.get("passed") else "no", source,
            ])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="policies.json files of moebench records")
    args = ap.parse_args()
    from tabulate import tabulate

    print(tabulate(CLAIMS, headers=["paper (our policy)", "GPU-memory saving", "speed", "accuracy drop"],
                   tablefmt="github"))
    print()
    table = []
    for path in args.files:
        table += rows(json.loads(path.read_text()), path.name)
    print(tabulate(table, headers=["model", "policy", "budget", "exact", "memory saving vs resident",
                                   "tok/s vs resident", "tok/s vs on-demand", "p50 latency cut vs on-demand",
                                   "acc drop", "passed", "file"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
