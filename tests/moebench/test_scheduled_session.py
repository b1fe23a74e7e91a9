"""A scheduling policy (ExpertFlow) in a benchmark session: its rounds are served regrouped, its outputs come back
in arrival order, and the record reports experts activated per batch. Exactness is judged against the resident
model served the same batches; agreement with first-come batching is reported beside it."""

import torch
from tests.moeoffload.models import tiny_mixtral

from moebench.measure import Session
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload


def test_expertflow_session_serves_a_schedule_exactly_and_reports_experts_per_batch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the path predictor trains far faster on one thread than on two contended ones
    try:
        suite = Suite(name="scheduled", models=[ModelSpec("tiny", lambda tier, dtype, device: (
            tiny_mixtral(seed=1).to(dtype), "seeded tiny Mixtral"))], budgets=["50%"],
            workload=Workload(batch_size=2, prompt_len=8, new_tokens=3, seed=0), policies=["expertflow"])
        session = Session(suite, device="cpu", tier="quick", rounds=4)
        record = session.run(Case("tiny", "expertflow", "50%"))
    finally:
        torch.set_num_threads(threads)
    assert record["passed"] and record["tokens_identical"]
    first_come, scheduled = record["experts_per_batch_first_come"], record["experts_per_batch_scheduled"]
    assert 0 < first_come <= 2 * 8 and 0 < scheduled <= 2 * 8  # 2 MoE layers of 8 experts
    # the scheduled reference: the resident model served the schedule's batches, memoized beside the plain one
    assert sorted(map(sorted, record["schedule"])) != [] and sum(map(len, record["schedule"])) == 4 * 2
    assert any("|schedule=" in key for key in session._refs)
    # on a CPU in fp32 a sequence's tokens do not depend on its batch mates: first-come agrees too
    assert record["first_come_token_agreement"] == 1.0
