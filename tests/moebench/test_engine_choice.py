"""The suites' kernels and fetch options in the engine's words: the one adapter (`moebench.engine`) and how a case
on grouped kernels is judged (bit-identical to the resident model on the same kernels; the resident model's
agreement with the exact loop reported beside it)."""

import pytest
from tests.moeoffload.models import tiny_mixtral

from moebench import engine
from moebench.measure import Session, check, expected_failure
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload


def _suite(policies):
    return Suite(name="kernels", models=[ModelSpec("mx", lambda tier, dtype, device: (tiny_mixtral(seed=3), "seeded"))],
                 budgets=["25%", "50%"], workload=Workload(batch_size=2, prompt_len=5, new_tokens=4),
                 policies=policies)


def test_exact_policies_on_the_reference_kernels_give_the_resident_models_tokens():
    session = Session(_suite(["lru", "next-use"]), rounds=2, kernels="reference")
    records = [session.run(Case("mx", p, b)) for p, b in [("resident", "all"), ("lru", "25%"), ("lru", "50%"),
                                                          ("next-use", "25%")]]
    session.close()
    assert {(r["kernels"], r["exact"]) for r in records} == {("reference", True)}
    assert records[0]["fetch"] == "host"  # every expert resident: nothing to fetch (the others: the engine's choice)
    assert all(r["passed"] and r["tokens_identical"] for r in records[1:])
    resident = records[0]
    assert 0.0 <= resident["eager_agreement"] <= 1.0 and resident["eager_kl"] >= 0.0
    assert all("eager_agreement" not in r for r in records[1:])


def test_on_the_exact_loop_there_is_no_eager_comparison():
    session = Session(_suite(["lru"]), rounds=1, kernels="exact")
    record = session.run(Case("mx", "resident", "all"))
    session.close()
    assert record["kernels"] == "exact" and "eager_agreement" not in record


def test_an_exact_policy_that_changes_a_token_on_grouped_kernels_is_a_real_failure():
    record = {"policy": "lru", "exact": True, "kernels": "reference", "weights": "synthetic:seed=0",
              "token_agreement": 0.75, "tokens_identical": False, "max_abs_logit_diff": 0.5, "accuracy_drop": 0.0,
              "cache_bytes": 1, "budget_bytes": 2}
    failures = check(record, 0.01, None)
    assert failures and "changed the greedy tokens" in failures[0]
    assert expected_failure({**record, "failures": failures, "passed": False}) is None


def test_engine_options_are_the_engines_arguments():
    exact, reference, auto = (engine.engine_options(k, "auto", "lru") for k in ("exact", "reference", "auto"))
    assert (exact, reference, auto) == ({"kernels": "exact", "fetch": "auto"},
                                        {"kernels": "reference", "fetch": "auto"},
                                        {"kernels": "auto", "fetch": "auto"})
    # device fetch is asked for only where it can serve: not on the exact loop, not for a predictor's cache
    assert engine.engine_options("reference", "device", "lru")["fetch"] == "device"
    assert engine.engine_options("exact", "device", "lru")["fetch"] == "host"
    assert engine.engine_options("reference", "device", "sida")["fetch"] == "host"


def test_engine_options_refuse_unknown_names():
    with pytest.raises(ValueError, match="kernels 'torch' is unknown; use one of auto, exact, triton, reference"):
        engine.engine_options("torch", "auto", "lru")
    with pytest.raises(ValueError, match="fetch 'gpu' is unknown"):
        engine.engine_options("auto", "gpu", "lru")


def test_records_of_older_engines_read_in_the_current_words():
    old = (None, "loop", "torch", "grouped-torch", "triton", "exact", "loop+triton")
    assert [engine.kernels_name(k) for k in old] == ["exact", "exact", "exact", "reference", "triton", "exact",
                                                     "exact+triton"]


def test_a_case_reports_the_plan_it_ran_on():
    class Plan:
        kernels, fetch = "triton", "device"

    class Handle:
        plan = Plan()

    assert engine.resolved(Handle()) == ("triton", "device")
