"""`moebench ab`: an interleaved A/B run, the verdict that survives a noisy machine.

Two pytest processes run the same suite selection, one per side: two source trees (commits, checked out as git
worktrees) or one tree with different options (`--b-args=--moebench-inject-delay=5%`). A `turns.Referee` lets them
run one decode step (or round) at a time, alternating, so round i of A and round i of B share the machine's state of
that moment: each pair's ratio is free of a shared machine's slow spells of seconds to minutes.

What pairing cannot cancel is the speed offset each process keeps for its whole run (a log s.d. of several percent
between A/A process pairs on a shared H100: benchmarks/results/h100-2026-11-24/ab_offsets.txt). So the run is
repeated over K process pairs (`--processes`, default 24, one after another, `--rounds` rounds a side in each, under
`OUT/p1` ... `OUT/pK`; which side takes the first turn alternates), and the verdict tests the K process pairs'
shifts against their own spread (`stats.compare_paired_groups`). `--processes 1` runs one pair and tests its rounds
(`stats.compare_paired`): right only on a machine without such offsets.

Each side writes its own history under `pK/a` and `pK/b` (the normal records, so `moebench history --dir OUT/p1/a`
and the reports read them); the comparison goes to `OUT/ab.json` and a table on stdout. Exit status: 0 when no
metric regressed beyond its limit, 1 when one did, 2 when a side failed to run or the run is unusable or unfinished.
Each finished pair leaves `pK/pair.json`; with `--timeout` a pair is started only if it fits, and `--resume` (same
settings) runs the pairs still missing, so one comparison can span several time-limited commands.

Both processes hold their models at once (one of them idle): an A/B run needs twice the host and GPU memory of one
side, and the NVML figure of each side includes the other's allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .turns import GRAINS, SIDES, Referee

# Each process keeps a speed offset of its own for its whole run, which pairing rounds cannot cancel: one process
# pair's verdict then gives false alarms far above its 1%. A verdict over K process pairs holds its level
# (stats.compare_paired_groups); resampling measured A/A pairs with the measured offset, 24 process pairs of 10 rounds
# flag a 5% slowdown in >= 95% of comparisons (benchmarks/results/h100-2026-11-24/stats_power_default.txt).
DEFAULT_GRAIN = "step"
DEFAULT_PROCESSES = 24
DEFAULT_GROUP_ROUNDS = 10  # rounds a side in each process pair, with --processes >= 3
# With no process offset, the A/A pairs' spread at step grain needs about 120 pairs to flag a 5% change with <= 1%
# false alarms (stats.pairs_needed; benchmarks/results/h100-2026-11-23g/stats_power_pairs_step_all.txt)
DEFAULT_PAIRS = 120  # rounds a side with --processes 1
PAIRED_METRICS = ("throughput", "latency")
RUN_FILE = "ab-run.json"  # a --processes run's settings: --resume goes on only with the same ones
PAIR_FILE = "pair.json"  # a finished process pair's outcome: --resume keeps the pair


class ABError(RuntimeError):
    """An A/B run that cannot give a verdict; the message names what to fix."""


def resolve_tree(spec: str, out: Path, side: str, repo: Path) -> tuple[Path, str | None]:
    """A side's source tree: an existing folder as it is, else a git ref checked out as a detached worktree under
    `out/trees/<side>` (returned second, for removal afterwards)."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve(), None
    tree = out / "trees" / side
    if tree.exists():
        raise ABError(f"{tree} already exists; remove it (git worktree remove --force {tree}) or pick another --out")
    proc = subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ABError(f"side {side}: {spec!r} is neither a folder nor a git ref of {repo} "
                      f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'git failed'})")
    return tree.resolve(), str(tree)


def _plugin_installed() -> bool:
    try:
        return any(ep.value == "moebench.plugin" for ep in metadata.entry_points(group="pytest11"))
    except Exception:  # a broken environment: load the plugin explicitly
        return False


def side_command(rounds: int, history: Path, extra: list[str], pytest_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--moebench", f"--moebench-rounds={rounds}",
           f"--moebench-history={history}", "--moebench-compare=none", "-p", "no:cacheprovider"]
    if not _plugin_installed():
        cmd[3:3] = ["-p", "moebench.plugin"]
    return cmd + extra + pytest_args


def _side_env(tree: Path, referee: Referee, side: str) -> dict[str, str]:
    env = dict(os.environ)
    src = tree / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(referee.env(side))
    return env


def run_sides(trees: dict[str, Path], commands: dict[str, list[str]], out: Path, *, timeout_s: float | None = None,
              progress: bool = True, grain: str = DEFAULT_GRAIN, first: str = "a") -> dict:
    """Start both sides under one referee and wait; returns each side's exit code, log and reported package
    folder, plus how many turns the referee granted. `first`: the side that takes the referee's first grant (the
    first timed round, once both have started up)."""
    referee = Referee(grain=grain)
    referee.start()
    role = {s: s for s in SIDES} if first == "a" else {"a": "b", "b": "a"}  # side -> the referee's name for it
    side_of = {r: s for s, r in role.items()}
    procs, logs = {}, {}
    t0 = time.perf_counter()
    try:
        for side in sorted(SIDES, key=lambda s: role[s]):
            logs[side] = out / f"{side}.log"
            with open(logs[side], "w") as log:
                log.write("$ " + shlex.join(commands[side]) + "\n")
            env = _side_env(trees[side], referee, role[side])
            procs[side] = subprocess.Popen(commands[side], cwd=trees[side], env=env,
                                           stdout=open(logs[side], "a"), stderr=subprocess.STDOUT)
        per = 2 if grain == "round" else 1  # round grain: two grants make a round pair
        every = 10 if grain == "round" else 200  # a progress line this often where no bar is shown (logs, CI)
        bar = _progress(progress, "round pairs" if grain == "round" else "turns")
        interrupted, shown = False, 0
        try:
            while any(p.poll() is None for p in procs.values()):
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    raise KeyboardInterrupt
                if len(referee.hello) < len(SIDES) and any(p.poll() is not None for p in procs.values()):
                    break  # a side ended before reaching the referee: the other would wait for it forever
                pairs = len(referee.log) // per
                if bar is not None:
                    bar.n = pairs
                    bar.refresh()
                elif pairs >= shown + every:
                    shown = pairs - pairs % every
                    print(f"moebench ab: {pairs} {'round pairs' if per == 2 else 'turns'}, "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:  # Ctrl-C or --timeout: let both sides store what they finished, then stop them
            interrupted = True
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if bar is not None:
            bar.n = len(referee.log) // per
            bar.close()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        referee.close()
    return {"returncode": {s: procs[s].returncode for s in SIDES}, "logs": {s: str(logs[s]) for s in SIDES},
            "package": {s: (referee.hello.get(role[s]) or (None, None))[1] for s in SIDES},
            "turns": len(referee.log), "wall_s": time.perf_counter() - t0, "referee_error": referee.error,
            "interrupted": interrupted, "grants": [[round(t - t0, 4), side_of[side]] for t, side in referee.log],
            **({"first": first} if first != "a" else {})}


def _progress(enabled: bool, unit: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc=f"moebench ab: {unit}", unit=unit.split()[-1].rstrip("s"), file=sys.stderr)


def _last_run(history: Path) -> dict | None:
    from .history import read_history

    if not (history / "history.jsonl").exists():
        return None
    runs, _ = read_history(history)
    return runs[-1] if runs else None


def _samples(record: dict, key: str | None) -> list[float]:
    """A record's per-round samples of `key` (empty when it has none)."""
    return list((record.get("samples") or {}).get(key or "") or [])


def compare_sides(run_a: dict, run_b: dict, limits: dict[str, float]) -> list[dict]:
    """One row per case both sides ran: per metric, the paired verdict on the rounds both sides have."""
    from . import stats
    from .baseline import METRICS, _median
    from .history import case_records, injected

    cases_a, cases_b = case_records(run_a), case_records(run_b)
    rows = []
    for name in [c for c in cases_a if c in cases_b]:
        ra, rb = cases_a[name], cases_b[name]
        row: dict[str, Any] = {"case": name, "metrics": {}}
        for key in PAIRED_METRICS:
            metric = METRICS[key]
            sa, sb = _samples(ra, metric.sample_key), _samples(rb, metric.sample_key)
            n = min(len(sa), len(sb))
            entry = {"a": _median(sa), "b": _median(sb), "pairs": n, "unpaired_rounds": abs(len(sa) - len(sb)),
                     "limit": limits.get(key)}
            if n == 0:
                entry.update(status="inconclusive", message=f"{key}: no per-round samples on one side")
            else:
                v = stats.compare_paired(sa[:n], sb[:n], higher_is_better=metric.higher_is_better,
                                         threshold=limits.get(key, 0.05))
                u = stats.compare(sa[:n], sb[:n], higher_is_better=metric.higher_is_better,
                                  threshold=limits.get(key, 0.05))
                entry.update(status=v.status, ratio=v.ratio, ci=[v.ci_low, v.ci_high], p=v.p_value, message=v.message,
                             unpaired_status=u.status, unpaired_ratio=u.ratio)
            row["metrics"][key] = entry
        row["injected"] = {"a": injected(ra), "b": injected(rb)}
        rows.append(row)
    return rows


def combine_process_pairs(pair_runs: list[tuple[dict, dict]], limits: dict[str, float],
                          pair_rows: list[list[dict]] | None = None) -> list[dict]:
    """One row per case over K process pairs (`--processes`): per metric, `stats.compare_paired_groups` on the
    process pairs with at least `stats.MIN_PAIRS` round pairs of that case; each process pair's own paired verdict
    is kept under `process_pairs` (None where that pair did not run the case). `pair_rows`: each pair's
    `compare_sides` rows when the caller has them already."""
    from . import stats
    from .baseline import METRICS, _median
    from .history import case_records

    if pair_rows is None:
        pair_rows = [compare_sides(a, b, limits) for a, b in pair_runs]
    per_pair = [{r["case"]: r for r in rows} for rows in pair_rows]
    records = [(case_records(a), case_records(b)) for a, b in pair_runs]
    names = list(dict.fromkeys(name for rows in per_pair for name in rows))
    rows = []
    for name in names:
        row: dict[str, Any] = {"case": name, "metrics": {}}
        for key in PAIRED_METRICS:
            metric = METRICS[key]
            groups, all_a, all_b = [], [], []
            each: list[dict | None] = []
            for (ca, cb), rows_j in zip(records, per_pair):
                if name not in rows_j:
                    each.append(None)
                    continue
                sa, sb = _samples(ca[name], metric.sample_key), _samples(cb[name], metric.sample_key)
                n = min(len(sa), len(sb))
                all_a += sa
                all_b += sb
                if n >= stats.MIN_PAIRS:
                    groups.append((sa[:n], sb[:n]))
                e = rows_j[name]["metrics"][key]
                each.append({k: e.get(k) for k in ("status", "ratio", "ci", "pairs", "message")})
            entry = {"a": _median(all_a), "b": _median(all_b), "pairs": sum(len(g[0]) for g in groups),
                     "processes": len(groups), "limit": limits.get(key), "process_pairs": each}
            if len(groups) < stats.MIN_PROCESS_PAIRS:
                entry.update(status="inconclusive", message=f"{key}: {len(groups)} process pair(s) with at least "
                             f"{stats.MIN_PAIRS} round pairs; a verdict needs {stats.MIN_PROCESS_PAIRS} (--processes)")
            else:
                v = stats.compare_paired_groups(groups, higher_is_better=metric.higher_is_better,
                                                threshold=limits.get(key, 0.05))
                entry.update(status=v.status, ratio=v.ratio, ci=[v.ci_low, v.ci_high], p=v.p_value, message=v.message)
            row["metrics"][key] = entry
        first = next(j for j, rows_j in enumerate(per_pair) if name in rows_j)
        row["injected"] = per_pair[first][name]["injected"]
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    from tabulate import tabulate

    table = []
    for row in rows:
        t = row["metrics"]["throughput"]
        lat = row["metrics"]["latency"]
        ci = t.get("ci") or [float("nan")] * 2
        table.append([row["case"], _fmt(t["a"]), _fmt(t["b"]), _fmt(t.get("ratio"), ".3f"),
                      f"{ci[0]:.3f}-{ci[1]:.3f}", t["pairs"], t["status"], t.get("unpaired_status", "-"),
                      _fmt(lat.get("ratio"), ".3f"), lat["status"]])
    return tabulate(table, headers=["case", "A tok/s", "B tok/s", "B/A", "99% CI", "pairs", "verdict",
                                    "unpaired verdict", "p50 B/A", "p50 verdict"], disable_numparse=True)


def plot_pairs(pair_runs: list[tuple[dict, dict]], rows: list[dict], path: Path) -> Path | None:
    """One panel per case: each round pair's B/A throughput ratio in run order (one colour per process pair when
    there are several), the estimate with its 99% interval, and the failure limit; a drift or a slow spell shows as
    a trend that the pairs do not follow. None when matplotlib is not installed (it is the optional extra
    `report`)."""
    from .history import case_records
    from .report import ReportError, _pyplot

    try:
        plt = _pyplot()
    except ReportError:
        return None

    records = [(case_records(a), case_records(b)) for a, b in pair_runs]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        t = row["metrics"]["throughput"]
        start = 1
        for j, (cases_a, cases_b) in enumerate(records):
            if row["case"] not in cases_a or row["case"] not in cases_b:
                continue
            sa, sb = _samples(cases_a[row["case"]], "tokens_per_s"), _samples(cases_b[row["case"]], "tokens_per_s")
            ratios = [b / a for a, b in zip(sa, sb)]
            label: str | None
            if len(records) == 1:
                label, color = "round pair B/A", "0.4"
            elif len(records) <= len(_PAIR_COLOURS):
                label, color = f"process pair {j + 1}", _PAIR_COLOURS[j]
            else:  # too many for a legend: one entry for all, the colours still tell the process pairs apart
                label = "round pair B/A (a colour per process pair)" if j == 0 else None
                color = _PAIR_COLOURS[j % len(_PAIR_COLOURS)]
            ax.plot(range(start, start + len(ratios)), ratios, ".", color=color, label=label)
            start += len(ratios)
        if t.get("ratio") is not None:
            ax.axhline(t["ratio"], color="C0", label=f"estimate {t['ratio']:.3f} ({t['status']})")
            ax.axhspan(*t["ci"], color="C0", alpha=0.2, label="99% interval")
        if t.get("limit"):
            ax.axhline(1 - t["limit"], color="C3", ls="--", lw=1, label=f"-{t['limit']:.0%} limit")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_title(row["case"], fontsize=9)
        ax.set_ylabel("B/A tokens/s")
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("round pair")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_PAIR_COLOURS = ("C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")  # C0 is the estimate, C3 the limit


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main(args: argparse.Namespace) -> int:
    limits = _check_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = [out] if args.processes == 1 else [out / f"p{k}" for k in range(1, args.processes + 1)]
    settings = {"a": args.a, "b": args.b, "a_args": args.a_args or "", "b_args": args.b_args or "",
                "rounds": args.rounds, "grain": args.grain, "fail": limits, "pytest_args": list(args.pytest_args)}
    if args.resume:
        kept = resume(out, folders, settings)  # the process pairs an earlier call finished
    else:
        _refuse_earlier_run(folders)
        kept = {}
        if args.processes > 1:
            (out / RUN_FILE).write_text(json.dumps(settings, indent=2))
    extra = {"a": shlex.split(args.a_args or ""), "b": shlex.split(args.b_args or "")}
    t0 = time.perf_counter()
    pairs, stopped = _run_pairs(args, out, folders, kept, extra)
    header = {"a": {"spec": args.a, "args": extra["a"]}, "b": {"spec": args.b, "args": extra["b"]},
              "pytest_args": args.pytest_args, "rounds": args.rounds, "grain": args.grain, "limits": limits}
    if args.processes == 1:
        rows, pair_runs, problems, result, turns = _one_pair_outcome(pairs[0], header, limits)
        wall_s = result["wall_s"]
    else:
        rows, pair_runs, problems, result, turns = _process_pairs_outcome(pairs, folders, header, limits,
                                                                           args.processes)
        wall_s = time.perf_counter() - t0
    if any(p["result"]["interrupted"] for p in pairs):  # the cases both sides finished are still compared and shown
        problems.append(f"interrupted (Ctrl-C or --timeout) after {turns} turns: a case in progress stores no "
                        "record; give the run more time or fewer rounds"
                        + ("; --resume runs the unfinished process pairs" if args.processes > 1 else ""))
    if stopped:
        problems.append(stopped)
    report = {**header, "rows": rows, "problems": problems, **result}
    (out / "ab.json").write_text(json.dumps(report, indent=2, default=str))
    return _conclude(out, rows, pair_runs, pairs, problems, wall_s)


def _check_args(args: argparse.Namespace) -> dict[str, float]:
    """Check the options and fill in the defaults that depend on others; returns the paired metrics' limits."""
    from .baseline import parse_limits

    limits = {k: v for k, v in parse_limits(args.fail).items() if k in PAIRED_METRICS}
    if args.processes < 1 or args.processes == 2:
        raise ABError(f"--processes {args.processes}: use 1 (one process pair) or at least 3 (a verdict over process "
                      f"pairs needs 3; default {DEFAULT_PROCESSES})")
    default_rounds = DEFAULT_PAIRS if args.processes == 1 else DEFAULT_GROUP_ROUNDS
    if args.rounds is None:
        args.rounds = default_rounds
    if args.rounds < 7:
        raise ABError(f"--rounds {args.rounds}: a paired verdict needs at least 7 round pairs; use the default "
                      f"{default_rounds}")
    if args.processes == 1:
        print("moebench ab: one process pair: its verdict does not cover the speed offset each process keeps for its "
              "whole run (on a shared GPU that raises its false alarms far above 1%); drop --processes 1 for a "
              "verdict that does", file=sys.stderr)
    if args.out is None:
        from .history import new_run_id

        args.out = os.path.join(".moebench", "ab", new_run_id())
    return limits


def _refuse_earlier_run(folders: list[Path]) -> None:
    for folder in folders:
        for side in SIDES:
            hist = folder / side / "history.jsonl"
            if hist.exists():
                raise ABError(f"{hist} exists from an earlier A/B run; pick a fresh --out so the sides' runs are "
                              "not mixed (or go on with an unfinished --processes run: --resume)")


def _run_pairs(args: argparse.Namespace, out: Path, folders: list[Path], kept: dict[int, dict],
               extra: dict[str, list[str]]) -> tuple[list[dict], str | None]:
    """Run the process pairs not `kept`, one after another, in the sides' trees (git refs checked out as worktrees
    for the run); returns every pair's outcome and, when --timeout stopped the run early, why."""
    repo = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip()
                or ".").resolve()
    specs = {"a": args.a, "b": args.b}
    trees, worktrees = {}, []
    pairs: list[dict] = []  # per process pair: run_sides' result, its problems and stored runs
    t0 = time.perf_counter()
    try:
        for side in SIDES:  # once: every process pair runs the same trees
            trees[side], wt = resolve_tree(specs[side], out, side, repo)
            if wt:
                worktrees.append(wt)
        print(f"moebench ab: A = {specs['a']} {' '.join(extra['a'])}".rstrip() + f"; B = {specs['b']} "
              f"{' '.join(extra['b'])}".rstrip() + f"; {args.rounds} rounds a side, interleaved"
              + (f", in each of {args.processes} process pairs" if args.processes > 1 else "") + f"; logs in {out}",
              file=sys.stderr)
        walls = [p["result"]["wall_s"] for p in kept.values()]  # the next process pair is started only if it fits
        for k, folder in enumerate(folders):
            if k in kept:
                pairs.append(kept[k])
                continue
            left = None if args.timeout is None else args.timeout - (time.perf_counter() - t0)
            if left is not None and walls and left < max(walls):
                return pairs, (f"--timeout: {len(pairs)} of {len(folders)} process pairs done, and the next would not "
                               f"finish in the {left:.0f} s left; run the same command with --resume to go on")
            pairs.append(_run_pair(args, trees, folder, k, len(folders), left, extra))
            walls.append(pairs[-1]["result"]["wall_s"])
            if pairs[-1]["problems"] or pairs[-1]["result"]["interrupted"]:
                break
    finally:
        for wt in worktrees:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", wt], capture_output=True)
    return pairs, None


def _run_pair(args: argparse.Namespace, trees: dict[str, Path], folder: Path, k: int, n: int, left: float | None,
              extra: dict[str, list[str]]) -> dict:
    """Process pair k of n: both sides under one referee; with several pairs its outcome also goes to its folder."""
    if n > 1:
        folder.mkdir(exist_ok=True)
        print(f"moebench ab: process pair {k + 1} of {n}", file=sys.stderr)
    commands = {s: side_command(args.rounds, folder / s, extra[s], args.pytest_args) for s in SIDES}
    result = run_sides(trees, commands, folder, timeout_s=left, progress=not args.no_progress,
                       grain=args.grain, first=SIDES[k % 2])  # alternate which side starts first
    pair = {"result": result, **_pair_outcome(result, trees, folder)}
    if n > 1:
        (folder / PAIR_FILE).write_text(json.dumps({key: pair[key] for key in ("result", "problems")}, indent=2,
                                                   default=str))
    return pair


def _one_pair_outcome(pair: dict, header: dict, limits: dict[str, float]):
    """--processes 1: the rows of its round pairs, its problems, its result and its turns."""
    result, problems, (run_a, run_b) = pair["result"], pair["problems"], pair["runs"]
    rows = compare_sides(run_a, run_b, limits) if not problems and run_a and run_b else []
    for side, run in (("a", run_a), ("b", run_b)):
        header[side]["commit"] = (run or {}).get("git")
    return rows, [(run_a, run_b)], problems, result, result["turns"]


def _process_pairs_outcome(pairs: list[dict], folders: list[Path], header: dict, limits: dict[str, float],
                           processes: int):
    """--processes K: the rows over the process pairs, every pair's problems, the per-pair results and the turns."""
    each_rows = [compare_sides(p["runs"][0], p["runs"][1], limits) if all(p["runs"]) else [] for p in pairs]
    pair_runs = [p["runs"] for p in pairs if all(p["runs"])]
    rows = combine_process_pairs(pair_runs, limits, [r for p, r in zip(pairs, each_rows) if all(p["runs"])]) \
        if pair_runs else []
    problems = [f"process pair {k + 1}: {msg}" for k, p in enumerate(pairs) for msg in p["problems"]]
    for side in SIDES:
        header[side]["commit"] = next((p["runs"][SIDES.index(side)] or {} for p in pairs), {}).get("git")
    result = {"processes": processes, "process_pairs": [  # each pair's grant log stays in its pair.json
        {"folder": str(folders[k]), **{n: v for n, v in p["result"].items() if n != "grants"},
         "rows": each_rows[k]} for k, p in enumerate(pairs)]}
    return rows, pair_runs, problems, result, sum(p["result"]["turns"] for p in pairs)


def _conclude(out: Path, rows: list[dict], pair_runs: list, pairs: list[dict], problems: list[str],
              wall_s: float) -> int:
    """Print the table, the plot's path and the verdicts; the exit status (0 unchanged, 1 regressed, 2 unusable)."""
    if rows:
        print(render(rows))
        plotted = plot_pairs(pair_runs, rows, out / "ab.png")
        if plotted:
            print(f"plot: {plotted}")
    if problems:
        for p in problems:
            print(f"moebench ab: error: {p}", file=sys.stderr)
        return 2
    for row in rows:
        for m in row["metrics"].values():
            if m["status"] != "unchanged":
                print(f"{row['case']}: {m['message']}")
    codes = " ".join(f"a={p['result']['returncode']['a']} b={p['result']['returncode']['b']}" for p in pairs)
    print(f"wrote {out / 'ab.json'}  (side exit codes {codes}, {wall_s:.0f} s)")
    regressed = [r["case"] for r in rows for k, m in r["metrics"].items()
                 if m["status"] == "regressed" and m["limit"] is not None]
    return 1 if regressed else 0


def resume(out: Path, folders: list[Path], settings: dict) -> dict[int, dict]:
    """The process pairs an earlier `--processes` call in `out` finished (index -> outcome), after checking that
    this call has the same settings. An unfinished pair's folder is moved aside to `pK.unfinished` (nothing stored
    is deleted) and run again."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise ABError(f"--resume: {out} holds no --processes run ({RUN_FILE} is missing); start one without --resume")
    stored = json.loads(run_file.read_text())
    changed = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in settings.items() if stored.get(k) != v]
    if changed:
        raise ABError(f"--resume: {'; '.join(changed)}: the run in {out} used other settings; resume with the same "
                      "ones, or pick a fresh --out")
    kept = {}
    for k, folder in enumerate(folders):
        pair_file = folder / PAIR_FILE
        if pair_file.exists():
            pair = json.loads(pair_file.read_text())
            runs = (_last_run(folder / "a"), _last_run(folder / "b"))
            if not pair["problems"] and not pair["result"]["interrupted"] and all(runs):
                kept[k] = {**pair, "runs": runs}
                continue
        if folder.exists():
            aside = folder.with_name(folder.name + ".unfinished")
            n = 1
            while aside.exists():
                n += 1
                aside = folder.with_name(f"{folder.name}.unfinished{n}")
            folder.rename(aside)
    print(f"moebench ab: resuming {out}: {len(kept)} of {len(folders)} process pairs done", file=sys.stderr)
    return kept


def _pair_outcome(result: dict, trees: dict[str, Path], folder: Path) -> dict:
    """What one process pair left: the problems that make it unusable and each side's stored run (None if none)."""
    problems = []
    for side in SIDES:
        pkg = result["package"][side]
        own = (trees[side] / "src" / "moebench").is_dir()  # a moebench checkout must measure its own code
        if own and pkg is not None and not Path(pkg).resolve().is_relative_to(trees[side]):
            problems.append(f"side {side} imported moebench from {pkg}, not from its tree {trees[side]}: the installed "
                            "package shadows it; uninstall it or install it editable")
        if pkg is None:
            problems.append(f"side {side} never reached the referee (see {result['logs'][side]})")
    runs = {s: _last_run(folder / s) for s in SIDES}
    for side in SIDES:
        if runs[side] is None:
            problems.append(f"side {side} stored no run (exit {result['returncode'][side]}; see "
                            f"{result['logs'][side]})")
    return {"problems": problems, "runs": (runs["a"], runs["b"])}


def add_parser(sub) -> None:
    from .baseline import DEFAULT_LIMITS

    p = sub.add_parser("ab", help="interleaved A/B run of two trees or option sets, verdict on round pairs",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--a", default=".", help="side A (the baseline): a source folder or a git ref (default .)")
    p.add_argument("--b", default=".", help="side B (the candidate): a source folder or a git ref (default .)")
    p.add_argument("--a-args", default="", help="extra pytest options for side A only (one quoted string)")
    p.add_argument("--b-args", default="", help="extra pytest options for side B only, written with '=', e.g. "
                                                "--b-args=--moebench-inject-delay=5%% (the sides must run the same "
                                                "cases)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"rounds a side, in each process pair (default {DEFAULT_GROUP_ROUNDS}; {DEFAULT_PAIRS} with "
                        "--processes 1)")
    p.add_argument("--processes", type=int, default=DEFAULT_PROCESSES,
                   help="A/B process pairs to run one after another (OUT/p1 ... OUT/pK), each with --rounds rounds a "
                        "side; the verdict tests the process pairs' shifts, which holds when each process keeps a "
                        f"speed offset of its own (default {DEFAULT_PROCESSES}; 1: one pair, its rounds tested, "
                        "which does not cover such an offset)")
    p.add_argument("--out", default=None, help="folder for both histories, logs and ab.json (default "
                                               ".moebench/ab/<time>; must not hold an earlier A/B run)")
    p.add_argument("--fail", default=DEFAULT_LIMITS,  # argparse %-formats help texts
                   help=f"failure limits (default {DEFAULT_LIMITS.replace('%', '%%')!r}; only throughput and latency "
                        "apply)")
    p.add_argument("--grain", choices=GRAINS, default=DEFAULT_GRAIN,
                   help=f"step: the sides alternate decode steps, so a pair's rounds interleave ~30 ms apart; round: "
                        f"they alternate whole rounds, ~1 s apart, and the pairs spread more (19%% against 13%% on "
                        f"an H100; default {DEFAULT_GRAIN})")
    p.add_argument("--timeout", type=float, default=None,
                   help="kill both sides after this many seconds (over all process pairs; with --processes, a pair "
                        "is started only if the longest one so far fits in the time left)")
    p.add_argument("--resume", action="store_true",
                   help="go on with the unfinished --processes run in --out (same settings): keep the process pairs "
                        "it finished, run the rest; --processes may grow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("pytest_args", nargs="*", help="after --: pytest arguments for both sides, e.g. suites/switch -k "
                                                     "lru")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        return main(args)
    except ABError as exc:
        print(f"moebench ab: error: {exc}", file=sys.stderr)
        return 2
