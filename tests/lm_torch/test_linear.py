"""The CPU linear layout (column blocks, bmm) computes what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_torch.layers.linear import SplitInputMajorLinear, use_cpu_linears


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [1, 2, 7, 130])
def test_split_linear_matches_nn_linear(bias, num_splits, rows):
    torch.manual_seed(rows * 10 + num_splits)
    reference = nn.Linear(48, 36, bias=bias)
    layer = SplitInputMajorLinear(reference, num_splits)
    x = torch.randn(rows, 48)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    # Leading dimensions are kept.
    x3 = torch.randn(2, rows, 48)
    assert layer(x3).shape == (2, rows, 36)
    torch.testing.assert_close(layer(x3), reference(x3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), reference.weight.detach())


def test_indivisible_output_falls_back_to_one_block():
    reference = nn.Linear(16, 35)
    layer = SplitInputMajorLinear(reference, 2)
    assert layer.num_splits == 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), reference(x))


def test_use_cpu_linears_converts_every_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    x = torch.randn(5, 8)
    expected = model(x)
    use_cpu_linears(model, num_splits=2)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, SplitInputMajorLinear) for m in model.modules()) == 2
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
