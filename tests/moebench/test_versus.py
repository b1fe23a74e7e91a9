"""moebench.versus: a new policy against the best stored policy of the same model, budget and workload."""


from moebench import versus
from moebench.cli import main

WL = {"batch_size": 2, "prompt_len": 16, "new_tokens": 8, "seed": 0}


def _rec(policy, tps, budget="25%", model="m", hit=0.5, weights="synthetic(seed=0, float32):m"):
    samples = [tps * (1 + 0.002 * i) for i in range(-5, 5)]
    return {"suite": "s", "case": f"{model}[{policy}-{budget}]", "model": model, "policy": policy, "budget": budget,
            "tier": "quick", "workload": WL, "weights": weights, "tokens_per_s": tps, "hit_rate": hit, "passed": True,
            "h2d_bytes_per_round": 2**20 * (1 - hit), "samples": {"tokens_per_s": samples}}


STORED = [_rec("lru", 100.0, hit=0.6), _rec("lfu", 80.0), _rec("lru", 50.0, budget="50%"),
          _rec("lru", 500.0, model="other")]


def test_the_rival_is_the_fastest_other_policy_of_the_same_model_budget_and_workload():
    assert versus.best_stored(STORED, _rec("mine", 120.0))["policy"] == "lru"
    assert versus.best_stored(STORED, _rec("mine", 120.0))["tokens_per_s"] == 100.0
    assert versus.best_stored(STORED, _rec("lru", 120.0))["policy"] == "lfu"  # never itself
    assert versus.best_stored(STORED, _rec("mine", 1.0, budget="75%")) is None
    calibrated = _rec("mine", 1.0, weights="synthetic(seed=0, routing=calibrated, float32):m")
    assert versus.best_stored(STORED, calibrated) is None  # other weights are not comparable


def test_verdicts():
    rows = {r["case"]: r for r in versus.judge(STORED, [_rec("mine", 150.0), _rec("mine", 60.0, budget="50%"),
                                                         _rec("mine", 100.0, budget="25%", model="x")])}
    assert rows["m[mine-25%]"]["verdict"] == "better" and rows["m[mine-25%]"]["ratio"] > 1.4
    assert rows["m[mine-50%]"]["verdict"] == "better"
    assert rows["x[mine-25%]"]["verdict"] == "no rival"
    assert versus.versus(_rec("mine", 100.0), STORED[0])["verdict"] == "tie"
    assert versus.versus(_rec("mine", 50.0), STORED[0])["verdict"] == "worse"
    text = versus.render(list(rows.values()))
    assert "best stored policy" in text and "lru" in text and "better" in text and "60.0% /" not in text


def test_versus_command(tmp_path, capsys):
    base, cur = tmp_path / "a.json", tmp_path / "b.json"
    from moebench import baseline as bl

    for path, records in ((base, STORED), (cur, [_rec("mine", 150.0)])):
        run = {"run_id": path.stem, "suites": ["s"], "records": records, "status": "complete"}
        bl.save(path, bl.from_run(run, "s", "test"), force=True)
    assert main(["versus", str(base), str(cur), "--history", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "m[mine-25%]" in out and "better" in out
    assert main(["versus", str(base), str(base), "--history", str(tmp_path / "h")]) == 1
