"""Fused residual add + RMSNorm against the reference and against the unfused `RMSNorm` layer it replaces."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference
from lm_torch.layers.norm import RMSNorm


@pytest.mark.parametrize("hidden", [48, 256])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_matches_reference_and_layer(case, hidden, with_residual, offset):
    from lm_torch.kernels.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(hidden + int(offset) * 7 + with_residual)
    x = case.randn(2, 5, hidden, generator=gen, scale=3.0)
    residual = case.randn(2, 5, hidden, generator=gen) if with_residual else None
    weight = case.randn(hidden, generator=gen, scale=0.5) + (0.0 if offset else 1.0)
    eps = 1e-5

    out, residual_out = rms_norm(x, weight, eps, residual, offset=offset)
    expected, expected_residual = reference.rms_norm(x, weight, eps, residual, offset=offset)
    case.assert_close(out, expected, case.elementwise_tol)
    if with_residual:
        # The sum is one rounding of the same float32 addition: exact.
        assert torch.equal(residual_out, expected_residual)
    else:
        assert residual_out is None

    layer = RMSNorm(hidden, eps=eps, offset=offset).to(case.device, case.dtype)
    layer.weight.data.copy_(weight)
    layer_out = layer(x, residual) if with_residual else layer(x)
    if with_residual:
        layer_out, layer_residual = layer_out
        assert torch.equal(residual_out, layer_residual)
    case.assert_close(out, layer_out, case.elementwise_tol)


def test_rms_norm_rejects_wrong_weight(case):
    from lm_torch.kernels.rms_norm import rms_norm

    x = case.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, x[0, :16], 1e-6)
