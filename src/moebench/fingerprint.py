"""Machine fingerprint and machine class: what a figure was measured on, and which stored baseline it meets.

A fingerprint is everything that moves a throughput figure without a code change (GPU and its count, driver,
CUDA, torch, transformers, Python, the commit and whether the tree was dirty). A machine class is the coarse key
under `baselines/`: figures from two H100 boxes are comparable, figures from an H100 and a laptop are not.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from pathlib import Path

# Known GPU families, most specific first: (pattern in the NVML name, class)
_GPU_CLASSES = (
    (r"\bH200\b", "h200"), (r"\bH100\b", "h100"), (r"\bH800\b", "h800"), (r"\bGH200\b", "gh200"),
    (r"\bB200\b", "b200"), (r"\bA100\b", "a100"), (r"\bA10G\b", "a10g"), (r"\bA10\b", "a10"),
    (r"\bL40S\b", "l40s"), (r"\bL4\b", "l4"), (r"\bV100\b", "v100"), (r"\bT4\b", "t4"),
)


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
    """GPU names and count, driver, CUDA, torch, transformers, Python, CPU and host."""
    info: dict[str, object] = {
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


COMMIT_ENV = "MOEBENCH_COMMIT"


def git_info(root: str | Path) -> dict:
    """Commit and dirty flag of the tree at `root` (None for both outside a git checkout).

    `$MOEBENCH_COMMIT`, when set, is the commit (dirty: False): for a copy of a tree whose `.git` is absent or
    stale, as on a machine that receives the working tree without its history (record the caller's HEAD)."""
    import os

    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return {"commit": given, "dirty": False, "source": COMMIT_ENV}

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


def machine_class(machine: dict, device: str | None = None) -> str:
    """'h100', 'a100', ... from the first GPU's name; 'cpu' when the run used no GPU (or there is none).

    An unknown GPU gets its name slugged ('nvidia-rtx-6000-ada'), so it never shares a baseline by accident.
    """
    gpu = machine.get("gpu") or {}
    names = gpu.get("names") or []
    if not names or (device is not None and not str(device).startswith("cuda")):
        return "cpu"
    name = names[0]
    for pattern, cls in _GPU_CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def describe(machine: dict) -> str:
    gpu = (machine.get("gpu") or {}).get("names")
    return f"{gpu[0]} x{len(gpu)}" if gpu else str(machine.get("cpu", "?"))
