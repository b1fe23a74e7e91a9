"""benchmarks/gpu_timeline.py: a step's GPU span split into copies, kernels, both and idle, from a chrome trace."""

import importlib.util
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st


def _timeline():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("gpu_timeline", os.path.join(root, "benchmarks", "gpu_timeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


timeline = _timeline()


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_a_step_splits_into_copies_kernels_overlap_and_idle():
    events = [
        _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 6500),  # a miss's copy, 0-6.5 ms
        _event("kernel", "attention", 6000, 1000),  # overlaps the copy's last 0.5 ms, 6-7 ms
        _event("kernel", "ffn", 6800, 400),  # overlaps the kernel above: counted once, up to 7.2 ms
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 9000, 10),  # the ring's copy: compute stream work
        _event("cpu_op", "aten::mm", 0, 99999),  # host activity is not the GPU's
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 50000},  # no duration
    ]
    got = timeline.summarize(events)
    assert got["span_ms"] == pytest.approx(9.01)
    assert got["copy_ms"] == pytest.approx(6.5)
    assert got["kernel_ms"] == pytest.approx(1.2 + 0.01)
    assert got["overlap_ms"] == pytest.approx(0.5)
    assert got["idle_ms"] == pytest.approx(9.01 - 7.2 - 0.01)
    assert (got["copies"], got["kernels"]) == (1, 3)
    assert timeline.summarize([])["span_ms"] == 0.0


intervals = st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 200)).map(lambda t: (t[0], t[0] + t[1])),
                     max_size=20)


@given(intervals, intervals)
def test_the_parts_add_up_to_the_span(copies, kernels):
    events = [_event("gpu_memcpy", "Memcpy HtoD", a, b - a) for a, b in copies]
    events += [_event("kernel", "k", a, b - a) for a, b in kernels]
    got = timeline.summarize(events)
    assert got["copy_ms"] + got["kernel_ms"] - got["overlap_ms"] + got["idle_ms"] == pytest.approx(got["span_ms"])
    assert min(got["copy_ms"], got["kernel_ms"]) >= got["overlap_ms"] >= 0 and got["idle_ms"] >= -1e-9
    covered = {x for a, b in copies + kernels for x in range(a, b)}
    busy = got["copy_ms"] + got["kernel_ms"] - got["overlap_ms"]
    assert busy * 1e3 == pytest.approx(len(covered))  # unit steps: the union's length is the points it covers
