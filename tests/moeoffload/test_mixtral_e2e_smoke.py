"""The end-to-end benchmark's logic on a tiny config (CPU): build without a second copy, cases, JSON after each."""

import json
import os
import subprocess
import sys


def test_mixtral_e2e_tiny_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "benchmarks/mixtral_e2e.py", "--tiny", "--part", "full", "--batches", "2",
           "--budgets", "50%", "--policies", "lookahead", "lru", "--steps", "2", "--warm", "0",
           "--kernels", "grouped-torch", "--gil-ab", "--ffn-ab", "grouped-mm", "--split-ab", "--profile",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "mixtral_e2e_full_b2_tiny.json").read_text())
    burn_in, *rows = result["rows"]
    assert burn_in["case"].startswith("burn-in/lookahead@50%")
    assert [(r["policy"], r["fetch"]) for r in rows] == [("lookahead", "host"), ("lru", "host"), ("lru", "device"),
                                                         ("lru", "device"), ("lru", "device"), ("lru", "device")]
    lru_host, lru_device, lru_gil_ab, lru_ffn_ab, lru_split_ab = rows[1:]  # the device makes the host's choices
    assert lru_split_ab["case"].endswith("/no-split") and lru_split_ab["misses_per_step"] == lru_host["misses_per_step"]
    assert lru_host["misses_per_step"] == lru_device["misses_per_step"] == lru_gil_ab["misses_per_step"]
    assert lru_ffn_ab["misses_per_step"] == lru_host["misses_per_step"]
    assert (lru_device["device_ffn"], lru_ffn_ab["device_ffn"]) == ("tiles", "grouped-mm")
    assert lru_ffn_ab["case"].endswith("/grouped-mm") and lru_gil_ab["case"].endswith("/switch-0.1ms")
    assert rows[0]["host_ms_per_step"] > 0
    assert all("error" not in r and r["steps"] == 2 == len(r["step_ms"]) and r["misses_per_step"] > 0 for r in rows)
    assert not any("burn-in" in name for name in os.listdir(tmp_path))  # the burn-in row is not profiled
    assert "x floor" in proc.stdout.splitlines()[-3] or "x floor" in proc.stdout


def test_against_peers_from_two_json_files(tmp_path):
    """`--against-peers FULL PEER` rebuilds the table from two earlier invocations, the burn-in row left out."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = [{"case": "burn-in/lru@75%", "layers": 32, "batch": 1, "ms_per_step": 320.0, "io_floor_ms_per_step": 80.0},
            {"case": "lru@75%", "layers": 32, "batch": 1, "ms_per_step": 96.0, "io_floor_ms_per_step": 80.0}]
    peer = [{"case": "accelerate cpu_offload", "layers": 4, "batch": 1, "ms_per_step": 1200.0},
            {"case": "engine resident@all", "layers": 4, "batch": 1, "ms_per_step": 8.0}]
    for name, rows in (("full.json", full), ("peer.json", peer)):
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    proc = subprocess.run([sys.executable, "benchmarks/mixtral_e2e.py", "--against-peers", str(tmp_path / "full.json"),
                           str(tmp_path / "peer.json")], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[:5] == ["lru@75%", "1", "3.00", "300.00", "100.0"]
    assert lines[1].split()[-2:] == ["1.20", "1.20"]  # 96 ms over the I/O floor of 80 (compute: 2 ms x 32 = 64)
