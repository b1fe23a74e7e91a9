"""Run history: one JSON object per line in `<dir>/history.jsonl`, appended atomically.

Each run is written as a single `os.write` of one complete line to an `O_APPEND` file descriptor, then fsynced:
concurrent writers never interleave within a line, and a crash leaves at most a torn last line, which
`read_history` skips and reports.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

SCHEMA_VERSION = 1
FILENAME = "history.jsonl"


def _clean(value):
    """JSON-safe: NaN/inf become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> dict | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = []
        for i in range(count):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else name)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"count": count, "names": names, "driver": driver.decode() if isinstance(driver, bytes) else driver}
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def machine_info() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
    except Exception:
        info["torch"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = None
    info["gpu"] = _gpu_info()
    return info


def git_info(root: str | Path) -> dict:
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = run("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": bool(status.strip()) if status is not None else None}


def make_run(records: list[dict], suites: list[str], root: str | Path, options: dict | None = None) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(root),
        "suites": suites,
        "options": options or {},
        "records": records,
    }


def append(directory: str | Path, run: dict) -> Path:
    """Append `run` as one line to `<directory>/history.jsonl`; returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
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


def read_history(directory_or_file: str | Path) -> tuple[list[dict], list[str]]:
    """(runs, problems): every complete run in order; lines that do not parse are skipped and reported."""
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        return [], []
    data = path.read_bytes()
    runs, problems = [], []
    lines = data.split(b"\n")
    last_index = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        torn = i == last_index  # no newline after it: a write that did not finish
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            what = "truncated last line" if torn else "unreadable line"
            problems.append(f"{path}:{i + 1}: {what} skipped ({exc.__class__.__name__})")
            continue
        if torn:
            problems.append(f"{path}:{i + 1}: last line has no newline (run may be incomplete)")
        runs.append(obj)
    return runs, problems


def format_run_header(run: dict) -> str:
    m = run.get("machine", {})
    g = run.get("git", {})
    gpu = (m.get("gpu") or {}).get("names")
    commit = (g.get("commit") or "no git")[:12] + (" (dirty)" if g.get("dirty") else "")
    where = f"{gpu[0]} x{len(gpu)}" if gpu else m.get("cpu", "?")
    return (f"{run.get('timestamp', '?')}  suites {', '.join(run.get('suites', []))}  commit {commit}  "
            f"{m.get('hostname', '?')}: {where}  torch {m.get('torch')}  transformers {m.get('transformers')}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the moebench command: moebench history")
