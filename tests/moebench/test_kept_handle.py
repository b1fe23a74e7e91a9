"""A Session offloads a model once and switches the policy per case: the experts cross the host once per model,
each case's figures are its own cache's, and the model gets its experts back at close()."""

import torch
from tests.moeoffload.models import tiny_mixtral

from moebench.measure import Session
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload
from moeoffload.store import ExpertStore


def test_cases_of_one_model_share_one_offload_and_close_restores_it(monkeypatch):
    suite = Suite(name="kept", models=[ModelSpec("mx", lambda tier, dtype, device: (tiny_mixtral(seed=2), "seeded"))],
                  budgets=["25%", "50%"], workload=Workload(batch_size=2, prompt_len=5, new_tokens=3),
                  policies=["lru", "next-use", "oracle"])
    session = Session(suite, rounds=1)
    model, _ = session.model("mx")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    puts = []
    real_put = ExpertStore.put
    monkeypatch.setattr(ExpertStore, "put", lambda self, key, t: (puts.append(key), real_put(self, key, t))[1])
    records = [session.run(Case("mx", p, b)) for p in ["resident", "lru", "next-use", "oracle", "lru"]
               for b in (["all"] if p == "resident" else ["25%", "50%"])]
    store = model._moeoffload.store
    assert len(puts) == store.num_layers * store.num_experts, "a case moved the experts through the host again"
    assert all(r["passed"] and r["token_agreement"] == 1.0 for r in records)
    for r in records:  # each record's cache is its own case's
        assert r["n_slots"] == r["cache_bytes"] // r["stats"]["expert_bytes"] and r["cache_bytes"] <= r["budget_bytes"]
    assert records[1]["h2d_bytes_per_round"] == records[-2]["h2d_bytes_per_round"]  # lru-25% twice: same figures
    for r in records:  # where each case's wall time went, in order
        assert list(r["phase_s"]) == ["model", "prepare", "offload", "warmup", "rounds", "accuracy"]
        assert all(v >= 0 for v in r["phase_s"].values())
    session.close()
    assert not hasattr(model, "_moeoffload")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    session.close()  # idempotent
