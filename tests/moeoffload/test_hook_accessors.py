"""The hooks read a transformers module's attributes through typed accessors: the kind they need, or one error
naming the attribute."""

import pytest
import torch
from torch import nn

from moeoffload.errors import UnsupportedModelError
from moeoffload.hooks.base import function, integer, optional_tensor, submodule, tensor


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 4
        self.wi = nn.Linear(3, 5, bias=False)
        self.act = nn.ReLU()
        self.register_buffer("scale", torch.ones(2))


def test_accessors_return_the_attribute():
    m = Experts()
    assert submodule(m, "wi") is m.wi
    assert tensor(m.wi, "weight") is m.wi.weight
    assert tensor(m, "scale") is m.scale
    assert optional_tensor(m.wi, "bias") is None
    assert integer(m, "num_experts") == 4
    assert function(m, "act") is m.act


@pytest.mark.parametrize(("read", "name", "expected"), [
    (submodule, "scale", "an nn.Module"),
    (tensor, "wi", "a tensor"),
    (integer, "missing", "an int"),
    (function, "num_experts", "a callable"),
])
def test_wrong_kind_names_the_attribute(read, name, expected):
    with pytest.raises(UnsupportedModelError, match=f"Experts.{name} is .*expected {expected}"):
        read(Experts(), name)
