"""Does the order of the policies change between uniform and calibrated synthetic routing?

Runs suites at the quick tier twice, `--moebench-routing uniform` and `--moebench-routing calibrated`, one round a
case, and ranks each (model, budget)'s policies by bytes copied per generated token (fewest first; ties by hit
rate). Bytes and hit rates do not depend on the machine's speed, so one round and a loaded CPU give the same ranks
as a GPU would; tokens/s would not, and is not used. Prints, per model and budget, each policy's hit rate and MiB
per token under both routings with its two ranks, and Kendall's tau between the two orders (1: the same order).

    PYTHONPATH=src python benchmarks/routing_ranking.py --suites switch mixtral --out results/cpu-.../routing-ranking
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from scipy.stats import kendalltau
from tabulate import tabulate

ROUTINGS = ("uniform", "calibrated")
MIB = 2**20


def run_suite(suite: str, routing: str, out: Path, extra: list[str]) -> list[dict]:
    """The records of one quick-tier run of `suite` under `routing` (its log beside the history)."""
    history = out / f"{suite}-{routing}"
    cmd = [sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider", f"suites/{suite}",
           "--moebench", "--moebench-tier", "quick", "--moebench-rounds", "1", "--moebench-routing", routing,
           "--moebench-compare", "none", "--moebench-history", str(history), "-q", *extra]
    history.mkdir(parents=True, exist_ok=True)
    with open(history / "pytest.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    lines = (history / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["records"]


def plugin_args() -> list[str]:
    """`-p moebench.plugin` where the package is not installed (a bare checkout on PYTHONPATH=src); an installed one
    registers the plugin itself, and naming it twice is an error."""
    from importlib.metadata import entry_points

    return [] if any(e.name == "moebench" for e in entry_points(group="pytest11")) else ["-p", "moebench.plugin"]


def per_token(record: dict) -> float:
    tokens = record["workload"]["batch_size"] * record["workload"]["new_tokens"]
    return record.get("h2d_bytes_per_round", 0.0) / tokens


def ranks(records: list[dict]) -> dict[str, int]:
    order = sorted(records, key=lambda r: (per_token(r), -(r.get("hit_rate") or 0.0), r["policy"]))
    return {r["policy"]: i + 1 for i, r in enumerate(order)}


def compare(uniform: list[dict], calibrated: list[dict]) -> tuple[list[list], list[list]]:
    """Rows per (model, budget, policy) and one summary row per (model, budget) with Kendall's tau."""
    def groups(records):
        out: dict = {}
        for r in records:
            if r.get("budget") != "all" and r.get("h2d_bytes_per_round") is not None:
                out.setdefault((r["model"], r["budget"]), []).append(r)
        return out

    gu, gc = groups(uniform), groups(calibrated)
    rows, summary = [], []
    for key in sorted(set(gu) & set(gc)):
        u = {r["policy"]: r for r in gu[key]}
        c = {r["policy"]: r for r in gc[key]}
        both = sorted(set(u) & set(c))
        ru, rc = ranks([u[p] for p in both]), ranks([c[p] for p in both])
        for p in sorted(both, key=lambda p: rc[p]):
            rows.append([*key, p, f"{u[p]['hit_rate']:.1%}", f"{c[p]['hit_rate']:.1%}",
                         f"{per_token(u[p]) / MIB:.2f}", f"{per_token(c[p]) / MIB:.2f}", ru[p], rc[p]])
        tau = kendalltau([ru[p] for p in both], [rc[p] for p in both]).statistic
        moved = [p for p in both if abs(ru[p] - rc[p]) >= 3]
        summary.append([*key, len(both), f"{tau:.2f}", ", ".join(f"{p} {ru[p]}->{rc[p]}" for p in moved) or "-"])
    return rows, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=["switch", "mixtral"])
    ap.add_argument("--out", default=os.environ.get("OUT", "routing-ranking"))
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, e.g. -k switch-base-8")
    args = ap.parse_args()
    out = Path(args.out)
    rows, summary = [], []
    for suite in args.suites:
        records = {routing: run_suite(suite, routing, out, args.pytest_args) for routing in ROUTINGS}
        r, s = compare(records["uniform"], records["calibrated"])
        rows += r
        summary += s
    per_policy = tabulate(rows, headers=["model", "budget", "policy", "hit uniform", "hit calibrated",
                                         "MiB/token uniform", "MiB/token calibrated", "rank uniform",
                                         "rank calibrated"], disable_numparse=True)
    overall = tabulate(summary, headers=["model", "budget", "policies", "Kendall tau", "moved 3+ places"],
                       disable_numparse=True)
    text = f"{per_policy}\n\n{overall}\n"
    (out / "ranking.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
