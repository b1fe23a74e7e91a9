"""A scheduling policy (ExpertFlow) in a benchmark session: its rounds are served regrouped, its outputs come back
in arrival order (checked against the resident reference), and the record reports experts activated per batch."""

import pytest
import torch
from tests.moeoffload.models import tiny_mixtral

from moebench.measure import Session
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload


def test_expertflow_session_serves_a_schedule_exactly_and_reports_experts_per_batch():
    if not hasattr(Session, "prepare"):
        pytest.skip("this Session does not prepare predictive policies yet (moebench.measure.Session.prepare)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the path predictor trains far faster on one thread than on two contended ones
    try:
        suite = Suite(name="scheduled", models=[ModelSpec("tiny", lambda tier, dtype, device: (
            tiny_mixtral(seed=1).to(dtype), "seeded tiny Mixtral"))], budgets=["50%"],
            workload=Workload(batch_size=2, prompt_len=8, new_tokens=3, seed=0), policies=["expertflow"])
        record = Session(suite, device="cpu", tier="quick", rounds=4).run(Case("tiny", "expertflow", "50%"))
    finally:
        torch.set_num_threads(threads)
    assert record["passed"] and record["tokens_identical"]
    first_come, scheduled = record["experts_per_batch_first_come"], record["experts_per_batch_scheduled"]
    assert 0 < first_come <= 2 * 8 and 0 < scheduled <= 2 * 8  # 2 MoE layers of 8 experts
