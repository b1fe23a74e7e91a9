"""The layer host-cost benchmark's logic on a tiny width (CPU, the grouped path in plain torch): every variant runs
and lands in the JSON."""

import json
import os
import subprocess
import sys


def test_launch_cost_tiny_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "benchmarks/launch_cost.py", "--device", "cpu", "--kernels", "reference", "--hidden",
           "64", "--intermediate", "32", "--calls", "2", "--repeats", "1", "--batches", "1", "3", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "launch_cost.json").read_text())["rows"]
    variants = {r["variant"].strip() for r in rows}
    assert {"transformers grouped_mm experts", "engine resident experts (reference)", "route (fused)",
            "route (torch)", "grouped FFN by tiles", "unpermute"} <= variants
    assert {r["batch"] for r in rows} == {1, 3} and all(r["host_us"] > 0 for r in rows)
