"""The end-to-end benchmark's logic on a tiny config (CPU): a model built on meta with its experts in a given store,
every plan through the public API, one JSON row per case, the peer on the same model after `unload`."""

import json
import os
import subprocess
import sys


def test_mixtral_e2e_tiny_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "benchmarks/mixtral_e2e.py", "--tiny", "--batches", "2", "--budgets", "50%",
           "--policies", "lru", "lookahead", "--plans", "auto", "exact/host", "reference/device", "--steps", "2",
           "--warm", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "mixtral_e2e.json").read_text())["rows"]
    engine = [r for r in rows if not r.get("peer")]
    assert [(r["policy"], r["plan"]) for r in engine] == [
        ("lru", "exact"), ("lru", "exact"), ("lru", "reference+device-fetch"),
        ("lookahead", "exact"), ("lookahead", "exact"), ("lookahead", "reference+device-fetch")]
    assert all("error" not in r and r["steps"] == 2 == len(r["step_ms"]) and r["misses_per_step"] > 0
               for r in engine)
    # the same routing through every plan: the same misses (the device directory makes the host cache's choices)
    assert len({r["misses_per_step"] for r in engine if r["policy"] == "lru"}) == 1
    peer = [r for r in rows if r.get("peer")]
    assert len(peer) == 1 and peer[0]["case"] == "accelerate cpu_offload"  # measured, or the reason it was not
    assert "x floor" in proc.stdout
