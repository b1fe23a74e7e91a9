"""Run history: one JSON object per run and line in `<dir>/history.jsonl`, appended atomically.

A run holds one record per case, and each record the per-round samples of its timed metrics
(`samples.tokens_per_s`, `samples.round_s`, `samples.p50_ms`: one entry per round), the machine fingerprint, the
commit, and `status`: "complete", or "interrupted" for a session stopped by Ctrl-C or a failure of the session
itself (comparisons and baselines skip those unless asked).

Atomicity: a run is written as a single `os.write` of one complete line to an `O_APPEND` descriptor, then fsynced.
Concurrent writers never interleave within a line; a writer killed mid-write leaves at most a torn last line,
which readers skip with a warning and the next append starts on a fresh line. Anything else that does not read
as a moebench history (another tool's file, a corrupt line in the middle, a newer schema) is an error naming the
file, and the file is never written to.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import secrets
import sys
from pathlib import Path

from .fingerprint import describe, git_info, machine_class, machine_info

__all__ = ["SCHEMA_VERSION", "FILENAME", "HistoryError", "append", "read_history", "make_run", "find_run",
           "machine_info", "git_info", "format_run_header", "case_records"]

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: before per-round samples and run ids (records aggregate only)
FILENAME = "history.jsonl"
DEFAULT_WEIGHT_SOURCE = "synthetic"


class StoreError(ValueError):
    """A stored results file (history or baseline) that cannot be used as it is; the message names the fix."""


class HistoryError(StoreError):
    """A history file that is not a moebench history, or is corrupt beyond a torn last line."""


def _clean(value):
    """JSON-safe: NaN/inf become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def new_run_id(now: _dt.datetime | None = None) -> str:
    """Sortable and unique enough for one machine: UTC time plus 4 random hex digits."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def make_run(records: list[dict], suites: list[str], root: str | Path, options: dict | None = None, *,
             status: str = "complete", command: str | None = None, machine: dict | None = None,
             machine_cls: str | None = None, workers: dict | None = None) -> dict:
    """One history entry; `workers` (a run spread over xdist workers): worker id -> its slot, device, GPU model and
    the case it crashed in, if any; each record then names its worker."""
    now = _dt.datetime.now(_dt.timezone.utc)
    machine = machine if machine is not None else machine_info()
    options = options or {}
    records = [dict(r) for r in records]
    for r in records:
        r.setdefault("weight_source", DEFAULT_WEIGHT_SOURCE)
    run = {
        "schema": SCHEMA_VERSION,
        "run_id": new_run_id(now),
        "status": status,
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "machine_class": machine_cls or machine_class(machine, options.get("device")),
        "git": git_info(root),
        "suites": suites,
        "options": options,
        "records": records,
    }
    if workers:
        run["workers"] = workers
    return run


def _validate_run(obj, where: str) -> None:
    if not isinstance(obj, dict) or "records" not in obj or not isinstance(obj.get("records"), list):
        raise HistoryError(f"{where}: not a moebench history (a line is not a run with 'records'); point "
                           f"--moebench-history / --history at a moebench history directory, or move this file away")
    schema = obj.get("schema")
    if schema not in READABLE_SCHEMAS:
        raise HistoryError(f"{where}: history schema {schema!r}, this moebench reads {list(READABLE_SCHEMAS)}; "
                           f"upgrade moebench, or start a new history with --moebench-history DIR")


def _resolve(directory_or_file: str | Path) -> Path:
    path = Path(directory_or_file)
    return path / FILENAME if path.is_dir() or not path.suffix else path


def read_history(directory_or_file: str | Path) -> tuple[list[dict], list[str]]:
    """(runs, warnings): every complete run in file order. A torn last line (a writer killed mid-write) is
    skipped with a warning; anything else unreadable raises HistoryError naming the file and line."""
    path = _resolve(directory_or_file)
    if not path.exists():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HistoryError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    runs, problems = [], []
    lines = data.split(b"\n")
    last_index = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        torn = i == last_index  # no newline after it: a write that did not finish
        where = f"{path}:{i + 1}"
        try:
            obj = json.loads(raw)
        except ValueError:
            # a torn line from a killed writer: the last line, or followed by a run that was appended after it
            if torn or _looks_like_torn_run(raw):
                what = "truncated last line" if torn else "unreadable line"
                problems.append(f"{where}: {what} skipped (an incomplete run: a writer was stopped mid-write)")
                continue
            raise HistoryError(f"{where}: not JSON, so not a moebench history line; move the file away or point "
                               f"--moebench-history at another directory (the file is left as it is)") from None
        _validate_run(obj, where)
        if torn:
            problems.append(f"{where}: last line has no newline (run may be incomplete)")
        runs.append(obj)
    return runs, problems


def _looks_like_torn_run(raw: bytes) -> bool:
    """A prefix of a line this module wrote (every run line starts with '{"'); anything else is foreign."""
    return raw.startswith(b'{"') or raw == b"{"


def append(directory: str | Path, run: dict) -> Path:
    """Append `run` as one line to `<directory>/history.jsonl`; returns the file's path.

    The existing file is read first and must be a moebench history (else HistoryError, nothing written)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise HistoryError(f"{directory}: is a file, not a history directory; give a directory to "
                           f"--moebench-history (history.jsonl is written inside it)")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    read_history(path)  # refuse to append to a foreign or corrupt file
    line = (json.dumps(_clean(run), sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn last line (a writer killed mid-write) stays alone on its line
        written = os.write(fd, line)
        if written != len(line):  # only on a full disk or similar; the reader skips the torn line
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def find_run(runs: list[dict], ref: str) -> dict:
    """A run by id, unique id prefix, or index ('-1' the latest, '0' the first)."""
    if not runs:
        raise HistoryError("the history holds no runs; run a suite with --moebench first")
    try:
        index = int(ref)
    except ValueError:
        index = None
    if index is not None and -len(runs) <= index < len(runs) and len(ref) < 6:
        return runs[index]
    hits = [r for r in runs if str(r.get("run_id", "")).startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise HistoryError(f"no run {ref!r} in the history; `moebench history --list` shows the run ids")
    raise HistoryError(f"run id prefix {ref!r} matches {len(hits)} runs; give more of the id")


def case_records(run: dict) -> dict[str, dict]:
    """The run's records by case name (suite-qualified when the run covers several suites)."""
    multi = len(run.get("suites", [])) > 1
    out = {}
    for r in run.get("records", []):
        name = r.get("case", "?")
        out[f"{r.get('suite')}/{name}" if multi else name] = r
    return out


def injected(record: dict) -> str | None:
    """What a test hook injected into this record ('0.2 ms per MoE layer', '5% stretch'), or None for a real run."""
    if record.get("inject_delay_ms"):
        return f"{record['inject_delay_ms']:g} ms per MoE layer"
    if record.get("inject_slowdown"):
        return f"{record['inject_slowdown'] * 100:g}% stretch"
    return None


def format_run_header(run: dict) -> str:
    m = run.get("machine", {})
    g = run.get("git", {})
    commit = (g.get("commit") or "no git")[:12] + (" (dirty)" if g.get("dirty") else "")
    status = run.get("status", "complete")
    flag = "" if status == "complete" else f"  [{status.upper()}]"
    delay = {injected(r) for r in run.get("records", [])} - {None}
    if delay:
        flag += f"  [INJECTED DELAY {', '.join(sorted(str(d) for d in delay))}: not a real run]"
    return (f"{run.get('run_id', '(no id)')}  {run.get('timestamp', '?')}  suites {', '.join(run.get('suites', []))}"
            f"  commit {commit}  {m.get('hostname', '?')}: {describe(m)}  torch {m.get('torch')}  "
            f"transformers {m.get('transformers')}{flag}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the moebench command: moebench history")
