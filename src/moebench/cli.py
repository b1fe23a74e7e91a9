"""The `moebench` command: policies, history, baselines, comparisons, reports, exports.

Every subcommand reads the history (`--history`, default .moebench) and names a run by id, id prefix, or index
(-1: the latest). Errors about files are one line naming the file and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .sides import load_side, read_runs

DEFAULT_HISTORY = ".moebench"


def _policies(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import moeoffload

    rows = []
    for name in moeoffload.available_policies():
        p = moeoffload.get_policy(name)
        rows.append([p.name, "yes" if p.exact else "no", p.version, p.description])
    print(tabulate(rows, headers=["policy", "exact", "version", "description"], disable_numparse=True))
    return 0


def _runs(args: argparse.Namespace) -> list[dict]:
    return read_runs(args.history)


def _history(args: argparse.Namespace) -> int:
    from .history import format_run_header
    from .table import render

    runs = _runs(args)
    if not runs:
        print(f"no runs in {args.history}", file=sys.stderr)
        return 1
    if args.list:
        for run in runs:
            print(format_run_header(run))
        return 0
    for run in runs[-args.last:]:
        print(format_run_header(run))
        print(render(run.get("records", [])))
        print()
    return 0


def _latest_complete(runs: list[dict]) -> str:
    complete = [r for r in runs if r.get("status", "complete") == "complete"]
    if not complete:
        from .history import HistoryError

        raise HistoryError("no complete run in the history; run a suite with --moebench first")
    return complete[-1].get("run_id") or str(runs.index(complete[-1]))


def _baseline_update(args: argparse.Namespace) -> int:
    from . import baseline as bl
    from .history import find_run

    runs = _runs(args)
    run = find_run(runs, args.run or _latest_complete(runs))
    cls = args.machine_class or run.get("machine_class")
    if not cls:
        print("error: this run has no machine class (an old history); pass --machine-class, e.g. h100",
              file=sys.stderr)
        return 2
    command = (f"moebench baseline update --history {args.history} --run {run.get('run_id')}  "
               f"(run made by: {run.get('command') or 'unknown'})")
    earlier = [r for r in reversed(runs[: runs.index(run)])]  # the runs stored before it, newest first
    for suite in args.suite or run.get("suites", []):
        baseline = bl.add_earlier_runs(bl.from_run(run, suite, command), earlier, args.runs)
        path = bl.save(bl.path_for(args.dir, cls, suite), baseline, force=args.force)
        kept = len(baseline["runs"])
        print(f"wrote {path} from run {run.get('run_id')}" + (f" and {kept - 1} earlier" if kept > 1 else "")
              + f" ({len(bl.load(path)['cases'])} cases)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import baseline as bl
    from .history import format_run_header
    from .table import render

    limits = bl.parse_limits(args.fail)
    runs = _runs(args)
    a, b = load_side(runs, args.a), load_side(runs, args.b)
    base_cases = {r.get("case"): r for r in a.get("records", [])}
    records = [dict(r) for r in b.get("records", [])]
    comparisons = bl.compare_records(base_cases, records, limits, base_machine=a.get("machine"),
                                     cur_machine=b.get("machine"))
    for r, comp in zip(records, comparisons.values()):
        r["comparison"] = comp
    print(f"A (baseline): {format_run_header(a)}")
    print(f"B (current):  {format_run_header(b)}")
    print(render(records))
    regressed = [r for r in records if r["comparison"]["status"] == "regressed"]
    for r in regressed:
        print(f"REGRESSED {r['case']}: {r['comparison']['message']}")
    for line, _ in bl.verdict_notes(records, {s: f"A ({args.a})" for s in a.get("suites", [])}):
        print(line.removeprefix("baseline: "))
    return 1 if regressed else 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    page = write_report(_runs(args), args.out)
    print(f"wrote {page} and its PNG plots in {page.parent}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import to_pytest_benchmark
    from .history import find_run

    runs = _runs(args)
    run = find_run(runs, args.run or _latest_complete(runs))
    data = to_pytest_benchmark(run)
    text = json.dumps(data, indent=2)
    if args.out == "-":
        print(text)
    else:
        out = Path(args.out or f"moebench_{run.get('run_id', 'run')}.json")
        out.write_text(text + "\n")
        print(f"wrote {out}: {len(data['benchmarks'])} benchmarks from run {run.get('run_id')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .baseline import DEFAULT_LIMITS

    parser = argparse.ArgumentParser(prog="moebench", description="moeoffload benchmark suites: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("policies", help="list registered offloading policies")
    p.set_defaults(func=_policies)

    def with_history(p, *aliases):
        p.add_argument("--history", *aliases, dest="history", default=DEFAULT_HISTORY,
                       help=f"history directory or history.jsonl (default {DEFAULT_HISTORY})")
        return p

    h = with_history(sub.add_parser("history", help="print the last run(s) recorded in the history"), "--dir")
    h.add_argument("--last", type=int, default=1, help="how many runs to show (default 1)")
    h.add_argument("--list", action="store_true", help="one line per run, with its run id")
    h.set_defaults(func=_history)

    b = sub.add_parser("baseline", help="baselines/<machine-class>/<suite>.json")
    bsub = b.add_subparsers(dest="baseline_command", required=True)
    u = with_history(bsub.add_parser("update", help="write baselines from a stored run (default: latest complete)"))
    u.add_argument("--run", help="run id, id prefix or index (default: the latest complete run)")
    u.add_argument("--suite", action="append", help="only this suite (repeatable; default: every suite of the run)")
    u.add_argument("--machine-class", help="default: the run's (from its GPU name, e.g. h100)")
    u.add_argument("--dir", default="baselines", help="baselines folder (default baselines)")
    u.add_argument("--force", action="store_true", help="replace a file that does not read as a baseline")
    u.add_argument("--runs", type=int, default=1, metavar="N",
                   help="keep the samples of up to N-1 earlier runs too; from 3 runs on, verdicts test at run level")
    u.set_defaults(func=_baseline_update)

    c = with_history(sub.add_parser("compare", help="compare run B against run A (ids, or baseline .json files)"))
    c.add_argument("a", help="baseline side: run id / prefix / index, or a baseline .json file")
    c.add_argument("b", help="current side: run id / prefix / index, or a baseline .json file")
    c.add_argument("--fail", default=DEFAULT_LIMITS,
                   help=f"failure limits (default {DEFAULT_LIMITS.replace('%', '%%')!r})")  # argparse %-formats help
    c.set_defaults(func=_compare)

    r = with_history(sub.add_parser("report", help="PNG plots and one self-contained HTML page"))
    r.add_argument("--out", default="moebench-report", help="output folder (default moebench-report)")
    r.set_defaults(func=_report)

    e = with_history(sub.add_parser("export", help="export a run in another tool's format"))
    e.add_argument("--format", choices=("pytest-benchmark",), default="pytest-benchmark")
    e.add_argument("--run", help="run id, id prefix or index (default: the latest complete run)")
    e.add_argument("--out", help="output file ('-' for stdout; default moebench_<run id>.json)")
    e.set_defaults(func=_export)

    z = sub.add_parser("zoo", help="the registry of published MoE architectures: sizes, expert bytes, fit")
    z.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB for the 'fits' column (default 80)")
    z.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    z.set_defaults(func=_zoo)

    from .ab import add_parser as add_ab_parser
    from .predictor_cmd import add_parser as add_predictor_parser
    from .routing_cmd import add_parser as add_routing_parser
    from .versus import add_parser as add_versus_parser

    add_ab_parser(sub)
    add_routing_parser(sub)
    add_versus_parser(sub)

    add_predictor_parser(sub)
    return parser


def _zoo(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .zoo import registry

    gpu = int(args.gpu_gb * 1e9)
    rows = []
    for name in registry.names():
        e = registry.get(name)
        s = e.sizes
        rows.append([name, f"{s.total_params / 1e9:.2f}", f"{s.active_params / 1e9:.2f}", s.moe_layers,
                     s.experts_per_layer, s.top_k, f"{e.expert_bytes(args.dtype) / 2**20:.1f}",
                     f"{e.bytes('float32') / 2**30:.1f}", f"{e.bytes('bfloat16') / 2**30:.1f}",
                     "yes" if e.fits(gpu, args.dtype) else "no", e.hub_id])
    print(tabulate(rows, headers=["model", "params B", "active B", "MoE layers", "experts", "top-k",
                                  f"expert MiB ({args.dtype})", "GiB fp32", "GiB bf16",
                                  f"fits {args.gpu_gb:g} GB ({args.dtype})", "transcribes (config.json)"],
                   disable_numparse=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .history import StoreError
    from .report import ReportError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # StoreError (history, baseline) and malformed limit specs
        kind = "error" if isinstance(exc, StoreError) else "usage error"
        print(f"moebench {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2
    except ReportError as exc:
        print(f"moebench report: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
