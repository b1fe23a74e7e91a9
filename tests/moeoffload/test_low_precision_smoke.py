"""benchmarks/low_precision.py's logic on a tiny config (CPU): every policy a row, its floor's bytes, its KL."""

import json
import os
import subprocess
import sys


def test_low_precision_benchmark_tiny_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "benchmarks/low_precision.py", "--tiny", "--steps", "1", "--warm", "0",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "low_precision.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["lru", "lru-int4", "lru-int4", "hobbit", "hobbit", "lru-int8", "lru-int8"]
    assert {r["dequant"] for r in rows[1:]} == {"arrival"}  # no Triton kernels on a CPU: both ways dequantize
    assert all("error" not in r for r in rows), rows
    by = {r["policy"]: r for r in rows}
    assert by["lru"]["kl_vs_resident"] == 0.0 and by["lru-int4"]["kl_vs_resident"] > 0.0
    assert by["lru-int4"]["expert_bytes_by_precision"]["int4"] < by["lru"]["expert_bytes_by_precision"]["full"]
    for r in rows:
        moved = sum(m * r["expert_bytes_by_precision"][p] for p, m in r["misses_by_precision_per_step"].items())
        assert r["h2d_bytes_per_step"] == (moved or r["misses_per_step"] * r["expert_bytes_by_precision"]["full"])
    assert "x floor" in proc.stdout
