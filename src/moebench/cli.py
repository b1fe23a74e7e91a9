"""The `moebench` command: list policies, show the last run from the history."""

from __future__ import annotations

import argparse
import sys


def _policies(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import moeoffload

    rows = []
    for name in moeoffload.available_policies():
        p = moeoffload.get_policy(name)
        rows.append([p.name, "yes" if p.exact else "no", p.version, p.description])
    print(tabulate(rows, headers=["policy", "exact", "version", "description"], disable_numparse=True))
    return 0


def _history(args: argparse.Namespace) -> int:
    from .history import format_run_header, read_history
    from .table import render

    runs, problems = read_history(args.dir)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not runs:
        print(f"no runs in {args.dir}", file=sys.stderr)
        return 1
    shown = runs[-args.last:]
    for run in shown:
        print(format_run_header(run))
        print(render(run.get("records", [])))
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moebench", description="moeoffload benchmark suites: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("policies", help="list registered offloading policies")
    p.set_defaults(func=_policies)
    h = sub.add_parser("history", help="print the last run(s) recorded in the history")
    h.add_argument("--dir", default=".moebench", help="history directory (default .moebench)")
    h.add_argument("--last", type=int, default=1, help="how many runs to show (default 1)")
    h.set_defaults(func=_history)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
