"""False-alarm and detection rates of ``moebench.stats.compare`` on simulated benchmark rounds.

Usage: python benchmarks/stats_power.py [--reps 2000] [--out power.json] [--noise-from HISTORY]

The per-round noise is ESTIMATED from the stored H100 run (see ``moebench.stats.estimate_round_cv``): that run holds
only 3-round aggregates, so the CV is a stand-in until repeated rounds are measured. Three noise models:
``lognormal`` (CV as estimated), ``lognormal-2x`` (twice that CV) and ``outliers`` (the estimated CV plus 5% of rounds
1.5x slower). Each cell runs ``--reps`` baseline-vs-current comparisons of throughput samples (higher is better)
through ``compare_many``, which shares ``compare``'s statistics and decision rule.

``--noise-from HISTORY --run-level`` models each run as an offset (the measured spread of run medians) plus rounds
resampled from the measured residuals within runs: what the per-round rule does when runs differ, at any n.

``--noise-from HISTORY --blocks`` resamples the measured rounds themselves in blocks of consecutive rounds (the
machine's slow spells kept), on raw and on machine-normalized tokens/s (``moebench.probe``): the noise "like that
measured on the device" with nothing assumed about its shape.

``--pairs-from AB_DIR [AB_DIR ...]`` takes the noise from MEASURED round pairs: the rounds of an interleaved A/A run
(``moebench ab``, both sides the same code: ``AB_DIR/a`` and ``AB_DIR/b``), or, for a history given instead, adjacent
rounds of one process. Each simulated comparison draws n pairs with replacement, each in a random orientation (A and
B of unchanged code are exchangeable), scales B by the slowdown and applies ``compare_paired``.
Resampled pairs lose one thing: an offset that stays with a process for its whole run (where its memory landed, its
CPU core). The A/A runs' own shifts show it: their spread beyond what their pairs explain is printed as the process
offset, and ``--process-offset SD`` scales B of each simulated comparison by ``exp(N(0, SD))`` to include it.
``--groups K [K ...]`` (with ``--pairs-from``) simulates ``moebench ab --processes K`` instead: each comparison draws
K process pairs of n resampled pairs (``--pairs``), each with its own offset ``exp(N(0, SD))`` on B, and applies
``compare_paired_groups``.

``--noise-from HISTORY`` takes the noise from MEASURED per-round samples instead (a history with schema 2, e.g. the
one ``benchmarks/stats_device.sh`` writes): ``measured`` is log-normal at the measured CV, ``empirical`` resamples the
measured log-residuals themselves (their skew and outliers included), ``measured-2x`` doubles the CV for margin.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.stats
from tabulate import tabulate

from moebench.stats import compare_many, estimate_round_cv

HISTORY = Path(__file__).resolve().parent / "results" / "h100-2026-11-23" / "history.jsonl"
SCENARIOS = {"identical": 0.0, "2% slower": 0.02, "5% slower": 0.05, "10% slower": 0.10}
ROUNDS = (5, 10, 20, 30)
SEARCH_ROUNDS = (50, 100, 150, 200, 250, 300, 400)


RESIDUALS: np.ndarray | None = None  # measured log-residuals, for the "empirical" model


def simulate(rng: np.random.Generator, model: str, cv: float, reps: int, n: int, slowdown: float) -> np.ndarray:
    if model == "empirical":
        return 100.0 * np.exp(rng.choice(RESIDUALS, size=(reps, n))) * (1.0 - slowdown)
    sigma = math.sqrt(math.log1p(cv * cv))  # log-normal with this coefficient of variation
    base = np.exp(rng.normal(0.0, sigma, (reps, n)))
    if model == "outliers":
        base = np.where(rng.random((reps, n)) < 0.05, base / 1.5, base)  # 1.5x slower round: throughput / 1.5
    return 100.0 * base * (1.0 - slowdown)


def cell(rng: np.random.Generator, model: str, cv: float, reps: int, n: int, slowdown: float, seed: int) -> dict:
    v = compare_many(simulate(rng, model, cv, reps, n, 0.0), simulate(rng, model, cv, reps, n, slowdown),
                     higher_is_better=True, seed=seed)
    return {s: v.rate(s) for s in ("regressed", "improved", "unchanged", "inconclusive")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="comparisons per cell (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--history", type=Path, default=HISTORY, help="stored run to estimate the noise from")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--noise-from", type=Path, help="history with measured per-round samples (schema 2)")
    ap.add_argument("--rounds", type=int, nargs="*", default=list(ROUNDS), help="rounds per side to tabulate")
    ap.add_argument("--blocks", action="store_true",
                    help="with --noise-from: resample blocks of consecutive measured rounds (the machine's slow "
                         "spells kept), raw and machine-normalized, instead of a noise model")
    ap.add_argument("--case", default=None,
                    help="with --blocks/--run-level: only records whose case name contains this")
    ap.add_argument("--run-level", action="store_true",
                    help="with --noise-from: model each run as an offset (log-sd of the measured run medians) plus "
                         "rounds resampled from the measured within-run residuals; normalized samples")
    ap.add_argument("--pairs-from", type=Path, nargs="+",
                    help="interleaved A/A run folders (moebench ab --out) or histories: paired verdicts (see above)")
    ap.add_argument("--pairs", type=int, nargs="*", default=[30, 50, 70, 100, 150, 200, 250],
                    help="with --pairs-from: pairs per comparison to tabulate")
    ap.add_argument("--process-offset", type=float, nargs="*", default=[0.0],
                    help="with --pairs-from: log s.d. of a per-comparison offset between the two processes (one "
                         "table each; see above)")
    ap.add_argument("--groups", type=int, nargs="*", default=None,
                    help="with --pairs-from: process pairs per comparison, for compare_paired_groups (see above)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.pairs_from:
        return pairs_main(args, t0)
    if args.noise_from and args.blocks:
        return blocks_main(args, t0)
    if args.noise_from and args.run_level:
        return run_level_main(args, t0)
    if args.noise_from:
        return measured_main(args, t0)
    est = estimate_round_cv(args.history)
    cv = est["cv_round"]
    print(f"Noise estimate from {args.history} (fields: model, policy, hit_rate, h2d_bytes_per_round, tokens_per_s, "
          f"rounds):")
    for a, b, x, y, lr in est["pairs"]:
        print(f"  same work: {a} {x:.2f} tok/s vs {b} {y:.2f} tok/s, log ratio {lr:+.4f}")
    print(f"  CV of a {est['rounds_per_record']}-round aggregate = rms(log ratio)/sqrt(2) = {est['cv_aggregate']:.4f}; "
          f"per-round CV = that * sqrt({est['rounds_per_record']}) = {cv:.4f}")
    print("  ESTIMATE from 4 pairs of 3-round aggregates; replace with the spread of measured repeated rounds.\n")
    models = {"lognormal": cv, "lognormal-2x": 2 * cv, "outliers": cv}
    rng = np.random.default_rng(args.seed)
    rows, results = [], []
    for model, mcv in models.items():
        for n in args.rounds:
            row = {"noise": model, "cv": mcv, "n": n}
            for name, slow in SCENARIOS.items():
                rates = cell(rng, model, mcv, args.reps, n, slow, args.seed)
                row[name] = rates
            results.append(row)
            rows.append([model, f"{row['cv']:.3f}", n, f"{row['identical']['regressed']:.2%}",
                         f"{row['identical']['inconclusive']:.1%}",
                         *(f"{row[s]['regressed']:.1%}" for s in ("2% slower", "5% slower", "10% slower"))])
    headers = ["noise", "CV/round", "n/side", "false alarm", "identical inconcl.", "flag 2%", "flag 5%", "flag 10%"]
    print(f"{args.reps} comparisons per cell; 'false alarm' = regressed on identical distributions (target <= 1%), "
          "'flag 5%' = detection of a true 5% slowdown (target >= 95%)")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    needed = {}
    for model, mcv in models.items():
        needed[model] = None
        for n in SEARCH_ROUNDS:
            fa = cell(rng, model, mcv, args.reps, n, 0.0, args.seed)["regressed"]
            det = cell(rng, model, mcv, args.reps, n, 0.05, args.seed)["regressed"]
            print(f"  search {model:12s} n={n:4d}: false alarm {fa:.2%}, 5% detection {det:.1%}")
            if fa <= 0.01 and det >= 0.95:
                needed[model] = {"n": n, "false_alarm": fa, "detection_5pct": det}
                break
    print("\nRounds per side needed for <= 1% false alarm and >= 95% detection of a 5% slowdown:")
    for model, got in needed.items():
        print(f"  {model:12s}: " + (f"n = {got['n']}" if got else f"more than {SEARCH_ROUNDS[-1]}"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"noise_estimate": est, "reps": args.reps, "rows": results,
                                        "rounds_needed": needed}, indent=2))
        print(f"wrote {args.out}")
    return 0



def measured_main(args, t0: float) -> int:
    """The same table and search with the noise measured in a history's per-round samples."""
    global RESIDUALS
    from moebench.stats import round_noise_from_history

    noise = round_noise_from_history(args.noise_from)
    RESIDUALS = np.asarray(noise["residuals"])
    cv = noise["cv_round"]
    print(f"Measured noise from {args.noise_from}: {noise['n_samples']} per-round samples of "
          f"{len(noise['records'])} records; per-round CV (sd of log-residuals about each record's median) = "
          f"{cv:.4f}; residual quantiles 1/50/99% = "
          + "/".join(f"{q:+.4f}" for q in np.quantile(RESIDUALS, [0.01, 0.5, 0.99])) + "\n")
    models = {"measured": cv, "empirical": cv, "measured-2x": 2 * cv}
    rng = np.random.default_rng(args.seed)
    rows, results, needed = [], [], {}
    for model, mcv in models.items():
        for n in args.rounds:
            row = {"noise": model, "cv": mcv, "n": n}
            for name, slow in SCENARIOS.items():
                row[name] = cell(rng, model, mcv, args.reps, n, slow, args.seed)
            results.append(row)
            rows.append([model, f"{mcv:.4f}", n, f"{row['identical']['regressed']:.2%}",
                         f"{row['identical']['inconclusive']:.1%}",
                         *(f"{row[s]['regressed']:.1%}" for s in ("2% slower", "5% slower", "10% slower"))])
            ok = row["identical"]["regressed"] <= 0.01 and row["5% slower"]["regressed"] >= 0.95
            if ok and needed.get(model) is None:
                needed[model] = {"n": n, "false_alarm": row["identical"]["regressed"],
                                 "detection_5pct": row["5% slower"]["regressed"]}
    headers = ["noise", "CV/round", "n/side", "false alarm", "identical inconcl.", "flag 2%", "flag 5%", "flag 10%"]
    print(f"{args.reps} comparisons per cell; targets: false alarm <= 1%, flag 5% >= 95%")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print("\nFewest tabulated rounds per side meeting both targets:")
    for model in models:
        got = needed.get(model)
        print(f"  {model:12s}: " + (f"n = {got['n']} (false alarm {got['false_alarm']:.2%}, 5% detection "
                                     f"{got['detection_5pct']:.1%})" if got else "none of the tabulated n"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"noise": {k: v for k, v in noise.items() if k != "residuals"},
                                        "reps": args.reps, "rows": results, "rounds_needed": needed}, indent=2))
        print(f"wrote {args.out}")
    return 0


def measured_series(history_path: Path, case: str | None) -> tuple[dict[str, np.ndarray], int]:
    """The unchanged rounds of a history in time order, one series per metric (raw tokens/s and tokens per
    probe-time), and how many records they came from. Records with an injected slowdown are left out."""
    from moebench.history import injected, read_history

    runs, _ = read_history(history_path)
    raw, norm, n = [], [], 0
    for run in runs:
        for r in run.get("records", []):
            s = r.get("samples") or {}
            if injected(r) or (case and case not in str(r.get("case"))) or not s.get("tokens_per_probe"):
                continue
            raw.extend(s["tokens_per_s"])
            norm.extend(s["tokens_per_probe"])
            n += 1
    return {"raw": np.asarray(raw), "normalized": np.asarray(norm)}, n


def run_level_main(args, t0: float) -> int:
    """What more rounds cannot average away: runs of unchanged code differ by an offset. Each simulated run is an
    offset drawn at the log-sd of the measured runs' medians plus n rounds drawn from the measured residuals about
    their own run's median (machine-normalized samples), so the rounds-based rule is tested at any n."""
    from moebench.history import injected, read_history

    runs, _ = read_history(args.noise_from)
    residuals, medians = [], []
    for run in runs:
        for r in run.get("records", []):
            s = (r.get("samples") or {}).get("tokens_per_probe")
            if not s or injected(r) or (args.case and args.case not in str(r.get("case"))):
                continue
            x = np.log(np.asarray(s))
            residuals.extend(x - np.median(x))
            medians.append(float(np.median(x)))
    if len(medians) < 3:
        print(f"{args.noise_from}: {len(medians)} unchanged runs with probe timings; need at least 3")
        return 1
    res, sd_run = np.asarray(residuals), float(np.std(medians, ddof=1))
    print(f"{len(medians)} unchanged runs, {res.size} rounds: log-sd between run medians {sd_run:.4f}, within runs "
          f"{np.std(res):.4f}")
    rng = np.random.default_rng(args.seed)
    rows, results = [], []
    for n in args.rounds:
        def draw(n=n):
            return np.exp(rng.choice(res, (args.reps, n)) + rng.normal(0.0, sd_run, (args.reps, 1)))

        base, same, slow = draw(), draw(), draw()
        row = {"n": n}
        for scenario, cur in (("identical", same), ("5% slower", slow * 0.95)):
            v = compare_many(base, cur, higher_is_better=True, seed=args.seed)
            row[scenario] = {s: v.rate(s) for s in ("regressed", "improved", "unchanged", "inconclusive")}
        results.append(row)
        rows.append([n, f"{row['identical']['regressed']:.1%}", f"{row['5% slower']['regressed']:.1%}"])
    print(tabulate(rows, headers=["n/side", "false alarm", "flag 5%"], tablefmt="github"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"history": str(args.noise_from), "runs": len(medians), "sd_run": sd_run,
                                        "reps": args.reps, "rows": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


def blocks_main(args, t0: float) -> int:
    """False alarms and detection with the device's own noise, slow spells included: each comparison takes two
    non-overlapping blocks of n consecutive measured rounds (as two runs taken at different times would see the
    machine), the second scaled down by the slowdown, raw and machine-normalized side by side."""
    series, n_records = measured_series(args.noise_from, args.case)
    total = series["raw"].size
    if total < 2 * min(args.rounds):
        print(f"{args.noise_from}: {total} unchanged rounds with probe timings; need at least {2 * min(args.rounds)}")
        return 1
    print(f"{total} unchanged rounds of {n_records} records from {args.noise_from} (case filter {args.case!r}); "
          f"sd(log) per round: raw {np.std(np.log(series['raw'])):.3f}, normalized "
          f"{np.std(np.log(series['normalized'])):.3f}")
    rng = np.random.default_rng(args.seed)
    rows, results = [], []
    for n in (n for n in args.rounds if 2 * n <= total):
        pairs = []
        while len(pairs) < args.reps:
            a, b = rng.integers(0, total - n + 1, 2)
            if abs(int(a) - int(b)) >= n:
                pairs.append((int(a), int(b)))
        for name, x in series.items():
            base = np.stack([x[a : a + n] for a, _ in pairs])
            cur = np.stack([x[b : b + n] for _, b in pairs])
            row = {"series": name, "n": n}
            for scenario, slow in SCENARIOS.items():
                v = compare_many(base, cur * (1.0 - slow), higher_is_better=True, seed=args.seed)
                row[scenario] = {s: v.rate(s) for s in ("regressed", "improved", "unchanged", "inconclusive")}
            results.append(row)
            rows.append([name, n, f"{row['identical']['regressed']:.1%}", f"{row['identical']['improved']:.1%}",
                         *(f"{row[s]['regressed']:.1%}" for s in ("2% slower", "5% slower", "10% slower"))])
    print(f"{args.reps} comparisons per cell; targets: false alarm <= 1% (regressed on identical code), "
          "flag 5% >= 95%")
    print(tabulate(rows, headers=["series", "n/side", "false alarm", "false 'improved'", "flag 2%", "flag 5%",
                                  "flag 10%"], tablefmt="github"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"history": str(args.noise_from), "rounds": total, "records": n_records,
                                        "reps": args.reps, "rows": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


def measured_pairs(sources: list[Path], case: str | None) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """(n, 2) array of measured round pairs (tokens/s): side a and b of A/A runs, or adjacent rounds of a history;
    and each A/A run's pair log ratios."""
    from moebench.history import injected, read_history

    pairs, notes, runs = [], [], []  # runs: the pairs of each A/A run, for the process offset
    for src in sources:
        if (src / "a").is_dir() and (src / "b").is_dir():
            (run_a,), (run_b,) = read_history(src / "a")[0][-1:], read_history(src / "b")[0][-1:]
            for ra in run_a["records"]:
                rb = next((r for r in run_b["records"] if r["case"] == ra["case"]), None)
                if rb is None or (case and case not in ra["case"]) or injected(ra) or injected(rb):
                    continue
                xa, xb = ra["samples"]["tokens_per_s"], rb["samples"]["tokens_per_s"]
                n = min(len(xa), len(xb))
                pairs.extend(zip(xa[:n], xb[:n]))
                runs.append(np.log(np.asarray(xb[:n], float) / np.asarray(xa[:n], float)))
                notes.append(f"{src}: {ra['case']}, {n} interleaved pairs (two processes)")
        else:
            runs, _ = read_history(src)
            for run in runs:
                for r in run.get("records", []):
                    x = (r.get("samples") or {}).get("tokens_per_s") or []
                    if injected(r) or (case and case not in str(r.get("case"))) or len(x) < 2:
                        continue
                    pairs.extend((x[k], x[k + 1]) for k in range(0, len(x) - 1, 2))
                    notes.append(f"{src}: {r['case']} of {run.get('run_id')}, {len(x) // 2} adjacent pairs "
                                 "(one process)")
    return np.asarray(pairs, dtype=float), notes, runs


def pairs_main(args, t0: float) -> int:
    """False alarms and detection of compare_paired with measured pair noise (see the module docstring)."""
    pairs, notes, runs = measured_pairs(args.pairs_from, args.case)
    if len(pairs) < 7:
        print(f"{args.pairs_from}: {len(pairs)} measured pairs; need at least 7")
        return 1
    d = np.log(pairs[:, 1] / pairs[:, 0])
    print("\n".join(notes))
    print(f"{len(pairs)} measured pairs; sd of the pair log ratio {np.std(d, ddof=1):.3f}, mean {np.mean(d):+.4f}, "
          f"quantiles 1/50/99% " + "/".join(f"{q:+.3f}" for q in np.quantile(d, [0.01, 0.5, 0.99])))
    offset = process_offset(runs)
    rng = np.random.default_rng(args.seed)
    results = []
    for sd in args.process_offset:
        results += groups_table(args, rng, pairs, sd) if args.groups else pairs_table(args, rng, pairs, sd)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"sources": notes, "n_pairs": len(pairs), "reps": args.reps,
                                        "pair_log_sd": float(np.std(d, ddof=1)), "process_offset": offset,
                                        "rows": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


def process_offset(runs: list[np.ndarray]) -> dict | None:
    """Each A/A run's shift (mean pair log ratio) and its standard error; the process offset is the spread of the
    shifts beyond those errors (method of moments, 0 when they explain it all): pairing cannot cancel it."""
    if len(runs) < 2:
        return None
    shifts = np.array([r.mean() for r in runs])
    ses = np.array([r.std(ddof=1) / np.sqrt(len(r)) for r in runs])
    for r, m, se in zip(runs, shifts, ses):
        print(f"  A/A run of {len(r)} pairs: shift {m:+.4f} (s.e. {se:.4f})")
    sd = float(np.sqrt(max(float(np.var(shifts, ddof=1) - np.mean(ses**2)), 0.0)))
    w = 1 / ses**2  # Cochran's Q: do the shifts differ by more than their errors?
    q = float(np.sum(w * (shifts - np.sum(w * shifts) / np.sum(w)) ** 2))
    p = float(scipy.stats.chi2.sf(q, len(runs) - 1))
    print(f"process offset (log s.d. of the shifts beyond their s.e., {len(runs)} runs): {sd:.4f}; Cochran's Q "
          f"{q:.2f} on {len(runs) - 1} df, p = {p:.3f}")
    return {"shifts": shifts.tolist(), "standard_errors": ses.tolist(), "offset_sd": sd, "cochran_q": q, "p": p}


def verdict_rates(rng: np.random.Generator, pairs: np.ndarray, k: int, n: int, reps: int, offset_sd: float,
                  judge) -> dict:
    """Per scenario, the share of each status over `reps` comparisons: k process pairs of n measured pairs drawn
    with replacement, each in a random orientation, B slowed by the scenario and offset per process pair by
    exp(N(0, offset_sd)); `judge(a, b)` (arrays of shape (k, n)) gives the verdict."""
    out = {}
    for name, slow in SCENARIOS.items():
        counts = dict.fromkeys(("regressed", "improved", "unchanged", "inconclusive"), 0)
        for _ in range(reps):
            idx = rng.integers(0, len(pairs), (k, n))
            swap = rng.random((k, n)) < 0.5
            a = np.where(swap, pairs[idx, 1], pairs[idx, 0])
            b = np.where(swap, pairs[idx, 0], pairs[idx, 1]) * (1 - slow) * np.exp(rng.normal(0, offset_sd, (k, 1)))
            counts[judge(a, b).status] += 1
        out[name] = {s: v / reps for s, v in counts.items()}
    return out


def pairs_table(args, rng: np.random.Generator, pairs: np.ndarray, offset_sd: float) -> list[dict]:
    """One table of compare_paired's verdicts on resampled pairs, B offset by exp(N(0, offset_sd)) per comparison."""
    from moebench.stats import compare_paired

    rows, results = [], []
    for n in args.pairs:
        row = {"pairs": n, "process_offset": offset_sd,
               **verdict_rates(rng, pairs, 1, n, args.reps, offset_sd,
                               lambda a, b: compare_paired(a[0], b[0], higher_is_better=True))}
        results.append(row)
        rows.append([n, f"{row['identical']['regressed']:.2%}", f"{row['identical']['unchanged']:.1%}",
                     *(f"{row[s]['regressed']:.1%}" for s in ("2% slower", "5% slower", "10% slower"))])
    print(f"{args.reps} comparisons per cell, process offset s.d. {offset_sd:.3f}; targets: false alarm <= 1%, "
          "flag 5% >= 95%")
    print(tabulate(rows, headers=["pairs", "false alarm", "identical: unchanged", "flag 2%", "flag 5%", "flag 10%"],
                   tablefmt="github"))
    met = [r["pairs"] for r in results if r["identical"]["regressed"] <= 0.01 and r["5% slower"]["regressed"] >= 0.95]
    print(f"fewest tabulated pairs meeting both targets: {min(met) if met else 'none'}")
    return results


def groups_table(args, rng: np.random.Generator, pairs: np.ndarray, offset_sd: float) -> list[dict]:
    """One table of compare_paired_groups' verdicts: K process pairs of n resampled pairs, B of each process pair
    offset by its own exp(N(0, offset_sd))."""
    from moebench.stats import compare_paired_groups

    rows, results = [], []
    for k in args.groups:
        for n in args.pairs:
            row = {"process_pairs": k, "pairs": n, "process_offset": offset_sd,
                   **verdict_rates(rng, pairs, k, n, args.reps, offset_sd,
                                   lambda a, b: compare_paired_groups(list(zip(a, b)), higher_is_better=True))}
            results.append(row)
            rows.append([k, n, k * n, f"{row['identical']['regressed']:.2%}", f"{row['identical']['unchanged']:.1%}",
                         *(f"{row[s]['regressed']:.1%}" for s in ("2% slower", "5% slower", "10% slower"))])
    print(f"SIMULATION from resampled measured pairs: {args.reps} comparisons per cell, process offset s.d. "
          f"{offset_sd:.4f} per process pair; targets: false alarm <= 1%, flag 5% >= 95%")
    print(tabulate(rows, headers=["process pairs", "pairs each", "pairs in all", "false alarm", "identical: unchanged",
                                  "flag 2%", "flag 5%", "flag 10%"], tablefmt="github"))
    met = [(r["process_pairs"], r["pairs"]) for r in results
           if r["identical"]["regressed"] <= 0.01 and r["5% slower"]["regressed"] >= 0.95]
    print(f"(process pairs, pairs each) meeting both targets: {met if met else 'none'}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
