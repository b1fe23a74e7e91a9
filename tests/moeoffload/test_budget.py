import pytest

import moeoffload
from moeoffload import BudgetError, UnknownPolicyError, UnsupportedModelError, parse_budget

from .models import tiny_mixtral


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5KiB", 1536),
                                           ("100B", 100), ("25%", 250), ("all", 1000), (4096, 4096)])
def test_budget_forms(text, expected):
    assert parse_budget(text, 1000) == expected


@pytest.mark.parametrize("text,hint", [("2GB", "2GiB"), ("-1GiB", "negative"), ("12", "no unit"),
                                       ("lots", "not a size"),
                                       ("3 parsecs", "unknown unit"), ("150%", "over 100%"), (0, "positive")])
def test_bad_budgets_name_the_fix(text, hint):
    with pytest.raises(BudgetError, match=hint):
        parse_budget(text, 1000)


def test_budget_below_one_expert_per_layer_is_refused_before_anything_moves():
    model = tiny_mixtral()
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(BudgetError, match="fewer than one per MoE layer"):
        moeoffload.offload(model, "lru", "1KiB")
    with pytest.raises(BudgetError, match="gpu_budget='all'"):
        moeoffload.offload(model, "resident", "50%")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params


def test_unknown_policy_and_model_and_double_offload():
    model = tiny_mixtral()
    with pytest.raises(UnknownPolicyError, match="available: resident"):
        moeoffload.offload(model, "belady-but-misspelt", "all")
    import torch

    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        moeoffload.offload(torch.nn.Linear(2, 2), "lru", "all")
    with moeoffload.offload(model, "lru", "all"):
        with pytest.raises(moeoffload.MoeOffloadError, match="already offloaded"):
            moeoffload.offload(model, "lru", "all")
    with pytest.raises(moeoffload.NotOffloadedError):
        moeoffload.unload(model)
