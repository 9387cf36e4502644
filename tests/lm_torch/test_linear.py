"""The CPU linear layout (column blocks, bmm) computes what nn.Linear computes; `make_linear` picks the method of the
device it builds for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.layers.linear import (
    CpuSplitLinearMethod,
    Linear,
    SplitInputMajorLinear,
    TorchLinearMethod,
    make_linear,
)


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


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_takes_the_split_layout_after_loading(bias):
    torch.manual_seed(0)
    reference = nn.Linear(16, 12, bias=bias)
    layer = make_linear(BuildContext(cpu_linear_splits=3), 16, 12, bias)
    assert isinstance(layer, Linear) and isinstance(layer.method, CpuSplitLinearMethod)
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        if bias:
            layer.bias.copy_(reference.bias)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)  # before: the checkpoint layout
    layer.process_weights_after_loading()
    assert "weight" not in layer._parameters and tuple(layer.weight_blocks.shape) == (3, 16, 4)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), reference.weight.detach())


def test_linear_method_follows_the_build_device():
    assert isinstance(make_linear(BuildContext(device=torch.device("cpu")), 4, 4).method, CpuSplitLinearMethod)
    # A CUDA build in float32 (or without triton) multiplies with torch: no tensor is made here ("meta" weights).
    ctx = BuildContext(device=torch.device("cuda"), dtype=torch.float32)
    layer = Linear(4, 4, False, ctx, device="meta")
    assert isinstance(layer.method, TorchLinearMethod)
