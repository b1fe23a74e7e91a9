"""Where the per-process offset of `moebench ab --processes` runs comes from: each process pair's throughput shift
(mean log B/A over its round pairs) beside the log A/B ratio of its sides' machine probes (`moebench.probe`: a pure
Python loop, kernel launches, a small GEMM, a small copy; medians over the run), their correlations, and the
verdict's interval with and without the probe ratio as a covariate (least squares, the intercept's 99% t interval).

    PYTHONPATH=src python benchmarks/ab_offsets.py benchmarks/results/h100-2026-11-24/ab_processes/same_1 ...

A diagnosis, not a verdict: the covariate is chosen after looking, and a change under test that moves the probes
too would be partly adjusted away.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps
from tabulate import tabulate

from moebench.history import case_records, read_history

PROBES = ("total_s", "python_s", "launch_s", "gemm_s", "copy_s")


def process_pairs(run: Path) -> list[tuple[float, dict[str, float]]]:
    """(throughput shift, {probe: log A/B of its medians}) per process pair pK of one `moebench ab --processes` run."""
    out = []
    for pair in sorted(run.glob("p[0-9]*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else 0):
        if not pair.name[1:].isdigit():
            continue  # pK.unfinished
        rec = {}
        for side in "ab":
            runs, _ = read_history(pair / side)
            (rec[side],) = case_records(runs[-1]).values()  # one case per run here
        sa, sb = (np.asarray(rec[s]["samples"]["tokens_per_s"]) for s in "ab")
        n = min(sa.size, sb.size)
        probes = {k: float(np.log(np.median(rec["a"]["samples"]["probe"][k]) /
                                  np.median(rec["b"]["samples"]["probe"][k]))) for k in PROBES}
        out.append((float(np.mean(np.log(sb[:n] / sa[:n]))), probes))
    return out


def interval(y: np.ndarray, x: np.ndarray | None, confidence: float = 0.99) -> tuple[float, float, float, float]:
    """(estimate, low, high, residual s.d.) of the shift at equal probes, as ratios."""
    cols = [np.ones_like(y)] + ([x] if x is not None else [])
    design = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    dof = y.size - design.shape[1]
    s2 = float(resid @ resid) / dof
    se = float(np.sqrt(s2 * np.linalg.inv(design.T @ design)[0, 0]))
    t = float(sps.t.ppf(1 - (1 - confidence) / 2, dof))
    return float(np.exp(coef[0])), float(np.exp(coef[0] - t * se)), float(np.exp(coef[0] + t * se)), np.sqrt(s2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="moebench ab --out folders of --processes runs")
    args = ap.parse_args(argv)
    rows, summary = [], []
    for run in args.runs:
        pairs = process_pairs(run)
        if len(pairs) < 4:
            print(f"{run}: {len(pairs)} process pairs; need at least 4", file=sys.stderr)
            continue
        y = np.array([s for s, _ in pairs])
        for k, (shift, probes) in enumerate(pairs, 1):
            rows.append([f"{run.name}/p{k}", f"{shift:+.2%}"] + [f"{probes[p]:+.2%}" for p in PROBES])
        est, lo, hi, sd = interval(y, None)
        summary.append([run.name, "-", "-", f"{est:.3f}", f"{lo:.3f}-{hi:.3f}", f"{sd:.2%}"])
        for p in PROBES:
            x = np.array([pr[p] for _, pr in pairs])
            est, lo, hi, sd = interval(y, x)
            summary.append([run.name, p, f"{np.corrcoef(y, x)[0, 1]:+.2f}", f"{est:.3f}", f"{lo:.3f}-{hi:.3f}",
                            f"{sd:.2%}"])
    print(tabulate(rows, headers=["process pair", "tok/s shift B/A"] + [f"{p} A/B" for p in PROBES],
                   disable_numparse=True))
    print()
    print(tabulate(summary, headers=["run", "covariate", "corr", "B/A", "99% CI", "resid s.d."],
                   disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
