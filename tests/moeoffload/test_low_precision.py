"""Low-precision policies end to end: lru-int8, lru-int4 and hobbit on a small Mixtral, their counts and refusals."""

from dataclasses import replace

import pytest
import torch

import moeoffload
from moeoffload import Policy
from moeoffload.errors import BudgetError, UnsupportedModelError

from . import models as M

LOW = ["lru-int8", "lru-int4", "hobbit"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _kl(logits, ref):
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@pytest.mark.parametrize("kernels", ["exact", "reference"])
@pytest.mark.parametrize("policy", LOW)
def test_low_precision_policies_stay_close_and_count_the_bytes_they_move(policy, kernels):
    model = M.tiny_mixtral(layers=3)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    with moeoffload.offload(model, policy, "40%", device="cpu", kernels=kernels) as handle:
        logits = _logits(model, ids)
        s = handle.stats()
        assert not s.exact and s.fetch == "host" and handle.plan.precision == s.precision
        assert s.h2d_bytes == sum(n * s.expert_bytes_by_precision[p] for p, n in s.misses_by_precision.items())
        assert s.misses == sum(s.misses_by_precision.values()) and s.hits == sum(s.hits_by_precision.values())
        assert s.cache_bytes + s.scratch_bytes <= s.budget_bytes
        assert s.n_slots > s.budget_bytes // handle.store.expert_bytes  # a budget holds more quantized experts
    assert _kl(logits, ref) < (1e-2 if policy != "lru-int8" else 1e-4)
    assert not torch.equal(logits, ref)
    assert torch.equal(_logits(model, ids), ref)  # unload gives the full-precision experts back


def test_int4_moves_fewer_bytes_per_expert_than_int8_than_full():
    model = M.tiny_mixtral()
    with moeoffload.offload(model, "lru-int8", "40%", device="cpu") as handle:
        int8 = handle.stats().expert_bytes
        handle.switch("lru-int4", "40%")
        int4 = handle.stats().expert_bytes
        full = handle.store.expert_bytes
        int4_store = handle.store.low_precision("int4")
        handle.switch("hobbit", "40%")
        assert handle.store.low_precision("int4") is int4_store  # made once, kept across switches
        assert handle.store.low_precisions == ("int8", "int4")
        assert handle.stats().expert_bytes_by_precision == {"full": full, "int4": int4}
    assert int4 < int8 < full


def _mixed(gate: float) -> Policy:
    return Policy(f"hobbit-{gate}", "test", precision="int4", full_precision_gate=gate, exact=False)


def test_hobbit_copies_full_precision_by_gate_weight():
    model = M.tiny_mixtral()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    with moeoffload.offload(model, _mixed(0.0), "40%", device="cpu") as handle:
        assert set(handle.stats().misses_by_precision) == {"full", "int4"}
        _logits(model, ids)
        assert handle.stats().misses_by_precision["int4"] == 0
        handle.switch(_mixed(2.0), "40%")  # no gate weight reaches 2: every copy int4, as lru-int4
        mixed = _logits(model, ids)
        assert handle.stats().misses_by_precision["full"] == 0
        handle.switch("lru-int4", "40%")
        assert torch.equal(_logits(model, ids), mixed)


def test_hobbit_upgrades_an_expert_that_turns_out_to_matter():
    model = M.tiny_mixtral(layers=1)
    with moeoffload.offload(model, _mixed(0.5), "all", device="cpu") as handle:
        layer = handle.layers[0]
        hidden = torch.randn(1, 64)
        layer(hidden, torch.tensor([[3, 5]]), torch.tensor([[0.9, 0.1]]))  # 3 full, 5 int4
        layer(hidden, torch.tensor([[5, 3]]), torch.tensor([[0.8, 0.2]]))  # 5 upgraded, 3 served full
        s = handle.stats()
        assert s.misses_by_precision == {"full": 2, "int4": 1} and s.upgrades == 1
        assert s.hits_by_precision == {"full": 1, "int4": 0}
        assert (0, 5) in handle.precisions.resident()["int4"] & handle.precisions.resident()["full"]


def test_a_model_whose_expert_form_the_quantizer_cannot_take_is_refused_by_name():
    model = M.tiny_gpt_oss()
    with pytest.raises(UnsupportedModelError, match="'gpt-oss-clamped' .*transposed.*use a full-precision policy"):
        moeoffload.offload(model, "lru-int4", "50%", device="cpu")
    with moeoffload.offload(model, "lru", "50%", device="cpu") as handle:
        with pytest.raises(UnsupportedModelError, match="gpt-oss-clamped"):
            handle.switch("hobbit", "50%")
        assert handle.stats().policy == "lru"  # refused before anything changed


def test_refusals_name_the_fix():
    model = M.tiny_mixtral()
    with pytest.raises(ValueError, match="fetch='device' does not serve"):
        moeoffload.offload(model, "lru-int4", "40%", device="cpu", kernels="reference", fetch="device")
    with pytest.raises(BudgetError, match="no int4 slot"):
        moeoffload.offload(model, "lru-int4", 4096, device="cpu")
    with pytest.raises(ValueError, match="approximate"):
        Policy("bad", "exact low precision", precision="int4")
    with pytest.raises(ValueError, match="unknown precision"):
        Policy("bad", "x", precision="int3", exact=False)


def test_statistics_stay_readable_after_unload_and_a_switch_back_to_full_precision():
    model = M.tiny_mixtral()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    handle = moeoffload.offload(model, "hobbit", "40%", device="cpu")
    _logits(model, ids)
    before = handle.stats()
    assert before.scratch_bytes == handle.store.expert_bytes  # one scratch expert for every layer
    handle.unload()
    assert replace(handle.stats(), scratch_bytes=before.scratch_bytes) == before
    with moeoffload.offload(model, "lru-int4", "40%", device="cpu") as handle:
        handle.switch("lru", "40%")
        assert handle.precisions is None and handle.stats().misses_by_precision == {}
