"""Runs in pytest-benchmark's JSON format, so its tooling (`pytest-benchmark compare`, dashboards) reads them.

One benchmark per case; its timed data are the per-round wall times in seconds (`samples.round_s`), which is what
pytest-benchmark's statistics expect (time per round, lower is better). The throughput figures ride along in
`extra_info`. Cases from runs before per-round samples (schema 1) are left out: there is nothing to put in `data`.
"""

from __future__ import annotations

import datetime as _dt

from pytest_benchmark import __version__ as _pb_version
from pytest_benchmark.stats import Stats

EXTRA = ("tokens_per_s", "p50_ms", "p99_ms", "hit_rate", "h2d_bytes_per_round", "torch_peak_bytes", "cache_bytes",
         "budget_bytes", "accuracy_drop", "weight_source", "policy_version", "tier", "dtype", "inject_delay_ms",
         "inject_slowdown")


def _machine_info(run: dict) -> dict:
    m = run.get("machine") or {}
    gpu = m.get("gpu") or {}
    return {"node": m.get("hostname"), "processor": m.get("cpu"), "machine": m.get("platform"),
            "python_implementation": "CPython", "python_version": m.get("python"), "release": m.get("platform"),
            "system": "Linux" if "Linux" in str(m.get("platform")) else m.get("platform"),
            "cpu": {"brand_raw": m.get("cpu"), "count": m.get("cpu_count")},
            "gpu": gpu.get("names"), "gpu_driver": gpu.get("driver"), "cuda": m.get("cuda"), "torch": m.get("torch"),
            "transformers": m.get("transformers"), "machine_class": run.get("machine_class")}


def _commit_info(run: dict) -> dict:
    g = run.get("git") or {}
    return {"id": g.get("commit") or "unversioned", "dirty": bool(g.get("dirty")), "project": "moebench",
            "branch": None, "time": run.get("timestamp"), "author_time": run.get("timestamp")}


def to_pytest_benchmark(run: dict) -> dict:
    benchmarks = []
    for r in run.get("records", []):
        data = (r.get("samples") or {}).get("round_s")
        if not data:
            continue
        stats = Stats()
        for d in data:
            stats.update(float(d))
        s = stats.as_dict()
        s["data"] = [float(d) for d in data]
        s["iterations"] = 1
        name = r.get("case", "?")
        benchmarks.append({
            "group": f"{r.get('suite')}/{r.get('model')}",
            "name": name,
            "fullname": f"suites/{r.get('suite')}::{name}",
            "params": {"policy": r.get("policy"), "budget": r.get("budget"), "model": r.get("model")},
            "param": f"{r.get('policy')}-{r.get('budget')}",
            "extra_info": {k: r.get(k) for k in EXTRA if k in r},
            "options": {"timer": "perf_counter (CUDA-synchronized)", "rounds": r.get("rounds"), "warmup": 1,
                        "disable_gc": False, "min_rounds": r.get("rounds"), "max_time": None, "min_time": None},
            "stats": s,
        })
    return {
        "machine_info": _machine_info(run),
        "commit_info": _commit_info(run),
        "benchmarks": benchmarks,
        "datetime": run.get("timestamp") or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "version": _pb_version,
        "moebench_run_id": run.get("run_id"),
        "moebench_status": run.get("status", "complete"),
    }
