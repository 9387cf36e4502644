"""Gated activations against the reference and against the layer's torch path (`lm_torch.layers.activation`)."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference
from lm_torch.layers.activation import GatedActivation
from lm_torch.layers.activation import gated_activation as layer_gated_activation
from lm_torch.layers.context import BuildContext


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new"])
@pytest.mark.parametrize("intermediate", [40, 1500])
def test_gated_activation(case, act, intermediate):
    from lm_torch.kernels.activation import gated_activation

    gen = torch.Generator().manual_seed(intermediate)
    gate_up = case.randn(3, 2, 2 * intermediate, generator=gen, scale=3.0)
    out = gated_activation(gate_up, act)
    assert out.shape == (3, 2, intermediate)
    case.assert_close(out, reference.gated_activation(gate_up, act), case.elementwise_tol)
    # The torch path rounds act(gate) to dtype before the product: one more rounding than the kernel.
    case.assert_close(out, layer_gated_activation(gate_up, act), 2 * case.elementwise_tol)
    # The layer built for a CPU device binds the torch path: the same values as the function.
    layer = GatedActivation(act, BuildContext(device=torch.device("cpu"), dtype=gate_up.dtype))
    assert layer._forward == layer.forward_native
    torch.testing.assert_close(layer(gate_up.cpu()), layer_gated_activation(gate_up.cpu(), act))


def test_gated_activation_rejects_unknown(case):
    from lm_torch.kernels.activation import gated_activation

    with pytest.raises(ValueError, match="relu"):
        gated_activation(case.randn(2, 8, generator=torch.Generator()), "relu")
