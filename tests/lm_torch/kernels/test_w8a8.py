"""W8A8 kernels: per-token int8 quantization against torch's (identical integers and scales), the int8 GEMM with
its scale/bias epilogue against exact float64 sums, and on CUDA the float8 path and `W8A8Linear` against the CPU
layer."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference


def _activations(case, rows, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = case.randn(rows, k, generator=gen)
    x[0, k // 3] = 40.0  # an outlier channel, as SmoothQuant's inputs have
    if rows > 2:
        x[2] = 0.0  # an all-zero token: the scale's floor, no division by zero
    return x, gen


@pytest.mark.parametrize(("rows", "k"), [(1, 64), (5, 300), (33, 2100)])
def test_quantize_per_token_equals_torch(case, rows, k):
    from lm_torch.kernels.w8a8 import quantize_per_token

    x, _ = _activations(case, rows, k, seed=k)
    x_q, scale = quantize_per_token(x)
    # On the CPU: torch's CUDA division by a scalar multiplies by the reciprocal (one unit in the last place off IEEE
    # division, which the kernel does, as the CPU layer does).
    want_q, want_scale = reference.quantize_per_token(x.cpu())
    assert x_q.dtype == torch.int8 and scale.shape == (rows, 1)
    assert torch.equal(scale.cpu(), want_scale.cpu())
    assert torch.equal(x_q.float().cpu(), want_q.cpu())


def test_quantize_rounds_ties_to_even(case):
    from lm_torch.kernels.w8a8 import quantize_per_token

    x = torch.zeros(1, 16)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5])  # scale exactly 1: the halves are ties
    x_q, scale = quantize_per_token(x.to(case.device, case.dtype))
    assert scale.item() == 1.0
    assert x_q[0, :6].tolist() == [127, 0, 2, 2, -2, 0]


@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 40, 64, False), (7, 96, 300, True), (70, 130, 256, True)])
def test_int8_gemm_matches_exact_sums(case, rows, n, k, bias):
    from lm_torch.kernels.w8a8 import int8_gemm, quantize_per_token

    x, gen = _activations(case, rows, k, seed=n)
    x_q, x_scale = quantize_per_token(x)
    weight = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8).to(case.device)
    weight_scale = (0.001 + 0.01 * torch.rand(n, 1, generator=gen)).to(case.device)
    b = case.randn(n, generator=gen) if bias else None
    block_k = 32 if case.device == "cpu" else 128
    out = int8_gemm(x_q, x_scale, weight, weight_scale, b, case.dtype, block_k=block_k)
    assert out.dtype == case.dtype and out.shape == (rows, n)
    # The int32 sums are exact; what remains is the epilogue's float32 products and one rounding to the dtype.
    case.assert_close(out, reference.w8a8_linear(x_q, x_scale, weight, weight_scale, b), case.elementwise_tol)


def test_int8_gemm_refuses_bad_operands(case):
    from lm_torch.kernels.w8a8 import int8_gemm

    x_q = torch.zeros(2, 32, dtype=torch.int8, device=case.device)
    ones = torch.ones(2, 1, device=case.device)
    with pytest.raises(ValueError, match="int8"):
        int8_gemm(x_q.float(), ones, x_q, ones, None, case.dtype)
    with pytest.raises(ValueError, match="contiguous"):
        int8_gemm(x_q, ones, torch.zeros(2, 16, dtype=torch.int8, device=case.device), ones, None, case.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float8_quantization_and_scaled_mm(dtype):
    from lm_torch.kernels.w8a8 import fp8_linear, quantize_per_token

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 256, generator=gen) * 3).to("cuda", dtype)
    x_q, scale = quantize_per_token(x, torch.float8_e4m3fn)
    want_scale = x.float().cpu().abs().amax(-1, keepdim=True) / 448  # IEEE division (see above)
    assert torch.equal(scale.cpu(), want_scale)
    want_q = (x.float().cpu() / want_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(x_q.float().cpu(), want_q)
    dense = torch.randn(64, 256, generator=gen).cuda()
    w_scale = dense.abs().amax(1, keepdim=True) / 448
    weight = (dense / w_scale).to(torch.float8_e4m3fn)
    out = fp8_linear(x_q, scale, weight, w_scale, None, dtype)
    expected = (x_q.float() @ weight.float().t()) * scale * w_scale.t()
    torch.testing.assert_close(out.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_w8a8_linear_on_cuda_matches_the_cpu_layer(quant_dtype, rows):
    from lm_torch.layers.context import BuildContext
    from lm_torch.layers.quant import W8A8Linear

    gen = torch.Generator().manual_seed(rows)
    layers = {}
    dense = torch.randn(96, 256, generator=gen)
    scale = dense.abs().amax(1, keepdim=True) / (127 if quant_dtype == "int8" else 448)
    weight = (
        (dense / scale).round().to(torch.int8) if quant_dtype == "int8" else (dense / scale).to(torch.float8_e4m3fn)
    )
    bias = torch.randn(96, generator=gen)
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        # Built for its device: a layer picks its kernel path at construction.
        ctx = BuildContext(device=torch.device(device), dtype=dtype)
        layer = W8A8Linear(256, 96, bias=True, quant_dtype=quant_dtype, dtype=dtype, ctx=ctx).to(device)
        with torch.no_grad():
            layer.weight.copy_(weight.to(device))
            layer.scale.copy_(scale.to(device))
            layer.bias.copy_(bias.to(device, dtype))
        layer.finish_loading()
        layers[device] = layer
    assert layers["cuda"].weight_t is None  # the kernels take the checkpoint's [out, in] weight
    x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
    want = layers["cpu"](x.float())
    got = layers["cuda"](x.cuda()).float().cpu()
    torch.testing.assert_close(got, want, atol=2e-2 * (1 + want.abs().max().item()), rtol=0)
