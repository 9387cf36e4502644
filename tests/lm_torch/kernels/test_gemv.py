"""The one-row GEMV against the float32 reference, and `SingleRowLinear` (which calls it) against nn.Linear."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference


@pytest.mark.parametrize(("n", "k"), [(70, 300), (256, 1024), (33, 77)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(case, n, k, split_k):
    from lm_torch.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(n * k + split_k)
    x = case.randn(1, k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    block_k = 32 if case.device == "cpu" else 512  # K not a multiple of the step: the last step is masked
    out = gemv(x, weight, block_k=block_k, split_k=split_k)
    assert out.shape == (1, n) and out.dtype == x.dtype
    case.assert_close(out, reference.linear(x, weight), case.elementwise_tol)


def test_gemv_rejects_bad_shapes(case):
    from lm_torch.kernels.gemv import gemv

    gen = torch.Generator()
    with pytest.raises(ValueError, match="gemv"):
        gemv(case.randn(2, 8, generator=gen), case.randn(4, 8, generator=gen))
    with pytest.raises(ValueError, match="gemv"):
        gemv(case.randn(1, 8, generator=gen), case.randn(4, 9, generator=gen))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_single_row_linear_replaces_plain_linears(dtype):
    from lm_torch.layers.cuda_linear import SingleRowLinear, use_gemv_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 520, bias=True), torch.nn.Linear(520, 64, bias=False))
    model = model.to("cuda", dtype)
    inputs = [torch.randn(rows, 256, device="cuda", dtype=dtype) for rows in (1, 5)]
    expected = [model(x).float() for x in inputs]
    assert use_gemv_linears(model) == 2 and all(isinstance(m, SingleRowLinear) for m in model)
    for x, want in zip(inputs, expected, strict=True):  # one row: the GEMV; five rows: cuBLAS as before
        got = model(x).float()
        torch.testing.assert_close(got, want, atol=2e-2 * (1 + want.abs().max().item()), rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's norm, Gemma's
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_with_the_norm_folded_in_matches_norm_then_product(case, offset, with_residual, split_k):
    from lm_torch.kernels.gemv import gemv
    from lm_torch.kernels.rms_norm import rms_norm

    n, k = 70, 300
    gen = torch.Generator().manual_seed(7 + split_k + int(with_residual) + int(offset))
    x = case.randn(1, k, generator=gen)
    residual = case.randn(1, k, generator=gen) if with_residual else None
    norm_weight = case.randn(k, generator=gen, scale=0.5)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    block_k = 32 if case.device == "cpu" else 512
    result = gemv(
        x, weight, block_k=block_k, split_k=split_k, norm_weight=norm_weight, residual=residual, eps=1e-5, offset=offset
    )
    # The unfused layers: the add + norm kernel (itself tested against the torch RMSNorm), then the product.
    normed, total = rms_norm(x, norm_weight, 1e-5, residual, offset)
    expected = reference.linear(normed, weight)
    if with_residual:
        out, residual_out = result
        assert torch.equal(residual_out.cpu(), total.cpu())  # the same rounded sum, bit for bit
    else:
        out = result
    case.assert_close(out, expected, case.elementwise_tol)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_gemv_with_the_gated_activation_folded_in(case, act):
    from lm_torch.kernels.activation import gated_activation
    from lm_torch.kernels.gemv import gemv

    n, k = 40, 200
    gen = torch.Generator().manual_seed(11)
    gate_up = case.randn(1, 2 * k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    out = gemv(gate_up, weight, block_k=32 if case.device == "cpu" else 512, act=act)
    case.assert_close(out, reference.linear(gated_activation(gate_up, act), weight), case.elementwise_tol)


def test_gemv_rejects_bad_folds(case):
    from lm_torch.kernels.gemv import gemv

    gen = torch.Generator()
    x, weight = case.randn(1, 8, generator=gen), case.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x, weight, norm_weight=case.randn(9, generator=gen))
    with pytest.raises(ValueError, match="residual"):
        gemv(x, weight, residual=x)
    with pytest.raises(ValueError, match="activation"):
        gemv(case.randn(1, 16, generator=gen), weight, act="relu")
