"""A policy against the best stored one: does a new policy beat the known ones on this model, budget and workload?

For each case of the current run whose policy is being judged, the opponent is the stored case (a baseline file or
a history run) of the same model, budget, workload, tier and weights with the highest throughput among the other
policies. The verdict is moebench.stats.compare's on the per-round tokens/s samples (machine-normalized where both
sides have them, as the regression check does): "better" where it says improved, "worse" where regressed, "tie"
where the interval lies within the threshold, else "inconclusive"; hit rate and bytes moved are shown beside it.
"""

from __future__ import annotations

import argparse
import sys

VERDICTS = {"improved": "better", "regressed": "worse", "unchanged": "tie"}


def _key(record: dict) -> tuple:
    import json

    return (record.get("model"), record.get("budget"), record.get("tier"),
            json.dumps(record.get("workload"), sort_keys=True, default=str))


def best_stored(stored: list[dict], record: dict) -> dict | None:
    """The fastest stored case of another policy on the same model, budget, workload, tier and weights."""
    from .baseline import comparability

    rivals = [r for r in stored if _key(r) == _key(record) and r.get("policy") != record.get("policy")
              and r.get("passed", True) and r.get("tokens_per_s") and not comparability(r, record)[0]]
    return max(rivals, key=lambda r: r["tokens_per_s"], default=None)


def _samples(record: dict, other: dict) -> tuple[str, list, list]:
    for key in ("tokens_per_probe", "tokens_per_s"):
        a, b = (other.get("samples") or {}).get(key), (record.get("samples") or {}).get(key)
        if a and b:
            return key, a, b
    return "tokens_per_s", [other["tokens_per_s"]], [record["tokens_per_s"]]


def versus(record: dict, rival: dict | None, threshold: float = 0.05) -> dict:
    """One row: the record against its rival, with the verdict by moebench.stats.compare."""
    from .stats import compare

    row = {"case": record.get("case"), "policy": record.get("policy"), "hit_rate": record.get("hit_rate"),
           "h2d_bytes_per_round": record.get("h2d_bytes_per_round")}
    if rival is None:
        return {**row, "verdict": "no rival", "message": "no stored case of another policy on this model, budget, "
                                                        "workload and weights"}
    key, base, cur = _samples(record, rival)
    v = compare(base, cur, higher_is_better=True, threshold=threshold)
    return {**row, "rival": rival.get("policy"), "rival_hit_rate": rival.get("hit_rate"),
            "rival_h2d_bytes_per_round": rival.get("h2d_bytes_per_round"), "ratio": v.ratio,
            "ci": [v.ci_low, v.ci_high], "samples": key, "verdict": VERDICTS.get(v.status, "inconclusive"),
            "message": v.message}


def render(rows: list[dict]) -> str:
    from tabulate import tabulate

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"

    def ratio(r):
        if r.get("ratio") is None:
            return "-"
        lo, hi = r["ci"]
        return f"{r['ratio']:.3f}x" + ("" if lo != lo else f" [{lo:.3f}, {hi:.3f}]")

    table = [[r["case"], r.get("rival") or "-", ratio(r), f"{pct(r['hit_rate'])} / {pct(r.get('rival_hit_rate'))}",
              f"{mib(r['h2d_bytes_per_round'])} / {mib(r.get('rival_h2d_bytes_per_round'))}", r["verdict"]]
             for r in rows]
    return tabulate(table, headers=["case", "best stored policy", "tokens/s ratio [99% CI]", "hit rate (new / best)",
                                    "H2D MiB/round (new / best)", "verdict"], disable_numparse=True)


def judge(stored: list[dict], current: list[dict], policies: list[str] | None = None,
          threshold: float = 0.05) -> list[dict]:
    """Rows for the current cases of `policies` (default: those with no stored case of their own)."""
    known = {r.get("policy") for r in stored}
    chosen = [r for r in current if r.get("policy") not in ("resident",)
              and (r.get("policy") in policies if policies else r.get("policy") not in known)]
    return [versus(r, best_stored(stored, r), threshold) for r in chosen]


def add_parser(sub) -> None:
    v = sub.add_parser("versus", help="a new policy against the best stored policy of each model, budget, workload")
    v.add_argument("a", help="stored side: run id / prefix / index, or a baseline .json file")
    v.add_argument("b", help="current side: run id / prefix / index, or a baseline .json file")
    v.add_argument("--policy", action="append", help="judge this policy (repeatable; default: policies A lacks)")
    v.add_argument("--threshold", type=float, default=0.05, help="tie band of the tokens/s ratio (default 0.05)")
    v.add_argument("--history", default=".moebench", help="history directory or history.jsonl (default .moebench)")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .sides import load_side, read_runs

    runs = read_runs(args.history)
    a, b = load_side(runs, args.a), load_side(runs, args.b)
    rows = judge(a.get("records", []), b.get("records", []), args.policy, args.threshold)
    if not rows:
        print("no case to judge: every policy of B is stored in A (name one with --policy)", file=sys.stderr)
        return 1
    print(render(rows))
    return 0
