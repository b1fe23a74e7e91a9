"""The two sides a CLI comparison reads: runs from the history, or a baseline file read as a run
(`moebench compare`, `moebench versus`)."""

from __future__ import annotations

import sys
from pathlib import Path


def read_runs(history_path: str) -> list[dict]:
    """Every run of the history; a damaged line is reported on stderr and skipped."""
    from .history import read_history

    runs, problems = read_history(history_path)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return runs


def load_side(runs: list[dict], ref: str) -> dict:
    """A run from the history, or a baseline file turned into a run-shaped dict."""
    from . import baseline as bl
    from .history import find_run

    if ref.endswith(".json") and Path(ref).exists():
        b = bl.load(ref)
        return {"run_id": ref, "suites": [b["suite"]], "records": list(b["cases"].values()), "git": b.get("git"),
                "machine": b.get("machine"), "timestamp": b.get("created")}
    return find_run(runs, ref)
