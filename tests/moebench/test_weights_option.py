"""--moebench-weights: suites read a published checkpoint from an offline Hugging Face cache, records say which
weights a case ran on, and a baseline case on other weights is not comparable."""

import json
import os
from pathlib import Path

import pytest

from moebench.baseline import compare_case, weights_class
from moebench.zoo import load_model, registry

pytest_plugins = ["pytester"]

SRC = Path(__file__).resolve().parents[2] / "src"  # this checkout's moebench, whatever the cwd of the subprocess

TINY = {"hidden_size": 64, "intermediate_size": 96, "vocab_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SUITE = '''
from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import zoo_model

SUITE = Suite(name="tiny", models=[zoo_model("mixtral-8x7b", quick_overrides={TINY})], budgets=["50%"],
              policies=["lru"], workload=Workload(batch_size=1, prompt_len=8, new_tokens=4, seed=0))
'''


def _hub_cache(root: Path) -> Path:
    """The tiny Mixtral saved as mistralai/Mixtral-8x7B-v0.1 in the hub cache layout under root/hub."""
    repo = root / "hub" / ("models--" + registry.get("mixtral-8x7b").hub_id.replace("/", "--"))
    model, _ = load_model("mixtral-8x7b", layers=2, overrides=TINY)
    model.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return root / "hub"


def _run(pytester, tmp_path, monkeypatch, weights, cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("MOEBENCH_WEIGHTS", raising=False)
    suite = tmp_path / "suites" / "tiny" / "suite.py"
    suite.parent.mkdir(parents=True, exist_ok=True)
    suite.write_text(SUITE.replace("{TINY}", repr(TINY)))
    hist = tmp_path / f"hist-{weights}"
    result = pytester.runpytest_subprocess("--moebench", str(suite), "--moebench-weights", weights,
                                           "--moebench-rounds", "1", "--moebench-history", str(hist),
                                           "--moebench-compare", "none", "-p", "no:cacheprovider")
    records = []
    if (hist / "history.jsonl").exists():
        records = json.loads((hist / "history.jsonl").read_text().splitlines()[-1])["records"]
    return result, records


@pytest.mark.slow
def test_suite_reads_the_checkpoint_from_the_offline_cache(pytester, tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path)
    result, records = _run(pytester, tmp_path, monkeypatch, "checkpoint", cache)
    result.assert_outcomes(passed=2)
    assert {weights_class(r) for r in records} == {"checkpoint"}
    assert all(r["weights"].endswith("abc123") for r in records)
    result, records = _run(pytester, tmp_path, monkeypatch, "auto", tmp_path / "empty-hub")
    result.assert_outcomes(passed=2)
    assert {weights_class(r) for r in records} == {"synthetic calibrated"}


def test_a_missing_checkpoint_is_one_error(pytester, tmp_path, monkeypatch):
    result, records = _run(pytester, tmp_path, monkeypatch, "checkpoint", tmp_path / "empty-hub")
    assert result.ret != 0 and not records
    text = result.stdout.str()
    assert "errors during collection" in text and "moebench: 0 cases" in text  # stops before any case runs
    assert "mixtral-8x7b: --moebench-weights checkpoint, but neither 'mistralai/Mixtral-8x7B-v0.1'" in text


def test_a_corrupt_checkpoint_is_a_clear_error(pytester, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / ("models--" + registry.get("mixtral-8x7b").hub_id.replace("/", "--")) / "snapshots" / "r1"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{not json")
    result, _ = _run(pytester, tmp_path, monkeypatch, "checkpoint", cache)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*cannot read the config of checkpoint*r1*"])


def test_weights_decide_comparability():
    base = {"case": "m[lru-50%]", "tier": "quick", "weights": "synthetic(seed=0, float32):switch-base-8",
            "tokens_per_s": 10.0}
    calibrated = {**base, "weights": "synthetic(seed=0, routing=calibrated, float32):switch-base-8"}
    checkpoint = {**base, "weights": "checkpoint:/cache/models--google--switch-base-8/snapshots/x"}
    assert weights_class(base) == "synthetic" and weights_class(calibrated) == "synthetic calibrated"
    recalibrated = {**base, "weights": "synthetic(seed=0, routing=calibrated-v2, float32):switch-base-8"}
    assert weights_class(recalibrated) == "synthetic calibrated-v2"  # another calibration: not comparable
    assert weights_class(checkpoint) == "checkpoint" and weights_class({}) is None
    for other in (calibrated, checkpoint):
        verdict = compare_case(base, other, {})
        assert verdict["status"] == "not comparable" and "weights" in verdict["fields"]
    moved = {**checkpoint, "weights": "checkpoint:/elsewhere/snapshots/x"}
    assert compare_case(checkpoint, moved, {})["status"] != "not comparable"
    assert compare_case({k: v for k, v in base.items() if k != "weights"}, calibrated, {})["status"] != \
        "not comparable"


def test_routing_option_picks_the_routers_of_synthetic_models(monkeypatch):
    """--moebench-routing (MOEBENCH_ROUTING) decides what a suite model's routing="auto" builds, read when the
    model is built; the records say which (and a bad value names the option)."""
    import torch

    from moebench.zoo import zoo_model

    spec = zoo_model("mixtral-8x7b", quick_overrides=TINY)
    monkeypatch.setenv("MOEBENCH_ROUTING", "uniform")
    _, source = spec.build("quick", torch.float32, "cpu")
    assert "routing" not in str(source) and weights_class({"weights": str(source)}) == "synthetic"
    monkeypatch.setenv("MOEBENCH_ROUTING", "calibrated")
    _, source = spec.build("quick", torch.float32, "cpu")
    assert weights_class({"weights": str(source)}) == "synthetic calibrated"
    monkeypatch.setenv("MOEBENCH_ROUTING", "sideways")
    with pytest.raises(ValueError, match="--moebench-routing"):
        spec.build("quick", torch.float32, "cpu")
