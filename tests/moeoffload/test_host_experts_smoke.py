"""benchmarks/host_experts.py on a tiny config (CPU): every copy-only and host-assisted policy is a row with its
floors, the measurements and the CPU are recorded, and the summary sets the two kinds side by side."""

import json
import os
import subprocess
import sys


def test_host_experts_tiny_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "benchmarks/host_experts.py", "--tiny", "--batches", "1", "--budgets", "50%",
           "--steps", "2", "--warm", "0", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "host_experts.json").read_text())
    rows = result["rows"]
    assert [r["policy"] for r in rows] == ["lru", "next-use", "cpu-moe", "fiddler", "hybrid"]
    assert all("error" not in r and r["steps"] == 2 and r["combined_floor_ms"] <= r["copy_floor_ms"] for r in rows)
    cpu_moe = rows[2]
    assert cpu_moe["copied_per_step"] == 0 and cpu_moe["host_per_step"] == cpu_moe["misses_per_step"] > 0
    assert result["measurements"]["host_threads"] == 1 and "capability" in result["cpu"]
    assert "best host-assisted" in proc.stdout and "CPU:" in proc.stdout
