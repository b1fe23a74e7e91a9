"""Where a GPU step's time goes: copies, kernels, both at once, or neither (the GPU waiting for the host).

An offloaded decode step at batch 1 should cost its copies and little else. When it costs more, the question is
which of three it is: compute that did not overlap a copy, copies slower than the link, or idle time, when the GPU
had nothing to run because a stream waited for the host (a courier's wake-up, the host's launches). This runs one
callable under torch.profiler, keeps the chrome trace, and reduces the GPU's activities to four numbers of the
step's span: `copy_ms` (the union of host-to-device copies), `kernel_ms` (the union of kernels), `overlap_ms`
(both at once) and `idle_ms` (none). span = copy + kernel - overlap + idle.

    summary = profile_step(lambda: model(...), "trace.json.gz")    # a dict of those numbers

The profiler adds host time to every launch, so idle time here is an upper bound of the unprofiled step's.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Of two unions (sorted, disjoint)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarize(trace_events: list[dict]) -> dict:
    """The step's span and its parts, in ms, from a chrome trace's events ("ts" and "dur" in microseconds)."""
    copies, kernels = [], []
    for ev in trace_events:
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        cat, name = ev.get("cat", ""), ev.get("name", "")
        interval = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        if cat == "gpu_memcpy" and "HtoD" in name:
            copies.append(interval)
        elif cat == "kernel" or (cat in ("gpu_memcpy", "gpu_memset") and "HtoD" not in name):
            kernels.append(interval)
    copy_u, kernel_u = union(copies), union(kernels)
    busy = union(copy_u + kernel_u)
    if not busy:
        return {"span_ms": 0.0, "copy_ms": 0.0, "kernel_ms": 0.0, "overlap_ms": 0.0, "idle_ms": 0.0, "copies": 0,
                "kernels": 0}
    span = busy[-1][1] - busy[0][0]
    return {"span_ms": span / 1e3, "copy_ms": length(copy_u) / 1e3, "kernel_ms": length(kernel_u) / 1e3,
            "overlap_ms": length(intersection(copy_u, kernel_u)) / 1e3, "idle_ms": (span - length(busy)) / 1e3,
            "copies": len(copies), "kernels": len(kernels)}


def profile_step(fn: Callable[[], object], trace_path: str | None = None) -> dict:
    """Run `fn` once under torch.profiler (CPU and CUDA activities), synchronizing after it; keep the chrome trace at
    `trace_path` (gzipped when it ends in .gz) and return `summarize` of it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw) as f:
            text = f.read()
    if trace_path:
        opener = gzip.open if trace_path.endswith(".gz") else open
        with opener(trace_path, "wt") as f:
            f.write(text)
    return summarize(json.loads(text).get("traceEvents", []))
