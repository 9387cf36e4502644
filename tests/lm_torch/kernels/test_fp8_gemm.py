"""Blocked FP8 kernels: the per-token-group activation quantization against torch's (identical codes and scales),
and the blocked GEMM against float32 products of the dequantized operands, at row counts 1, 5 and 33 and with K and
N ending in partial blocks (fused parts each on their own block grid included)."""

from __future__ import annotations

import pytest
import torch

from lm_torch.layers.quant.fp8 import dequantize_blocks, quantize_blocks

GROUP = 128


def _torch_group_quant(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization in plain torch: s = max |x| / 448 per row and group, codes = e4m3(x / s)."""
    rows, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float().cpu(), (0, groups * group - k)).view(rows, groups, group)
    scale = padded.abs().amax(dim=-1).clamp(min=1e-10) / 448.0
    codes = (padded / scale[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes.view(rows, -1)[:, :k], scale


def _dequantized_activations(x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    k = x_q.shape[1]
    return x_q.float().cpu() * x_scale.float().cpu().repeat_interleave(GROUP, dim=1)[:, :k]


def _activations(case, rows: int, k: int, seed: int) -> torch.Tensor:
    x = case.randn(rows, k, generator=torch.Generator().manual_seed(seed), scale=2.0)
    x[0, k // 3] = 60.0  # an outlier: its group's other codes get small
    if rows > 2:
        x[2] = 0.0  # an all-zero row: the scale's floor, no division by zero
    return x


def _fused_weight(parts: list[int], k: int, device: str, seed: int):
    """A [sum(parts), k] float8 weight whose parts are quantized apart (each its own 128-row grid, as q/k/v are):
    (codes, scale blocks [R, groups], the scale row of each output [N] int32, the dequantized weight in float32)."""
    gen = torch.Generator().manual_seed(seed)
    codes, scales, row_of, dense = [], [], [], []
    for size in parts:
        q, s = quantize_blocks(torch.randn(size, k, generator=gen) * 0.05)
        row_of.append(sum(len(t) for t in scales) + torch.arange(size) // 128)  # the part's grid starts a new row
        codes.append(q)
        scales.append(s)
        dense.append(dequantize_blocks(q, s))
    return (
        torch.cat(codes).to(device),
        torch.cat(scales).to(device),
        torch.cat(row_of).to(torch.int32).to(device),
        torch.cat(dense),
    )


@pytest.mark.parametrize(("rows", "k"), [(1, 64), (5, 300), (33, 200)])
def test_group_quantization_equals_torch(case, rows, k):
    from lm_torch.kernels.fp8_gemm import quantize_per_token_group

    x = _activations(case, rows, k, seed=k)
    x_q, scale = quantize_per_token_group(x)
    want_q, want_scale = _torch_group_quant(x)
    assert x_q.dtype == torch.float8_e4m3fn and scale.shape == (rows, -(-k // GROUP))
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(x_q.cpu().view(torch.uint8), want_q.view(torch.uint8))


def test_rounding_to_e4m3_is_to_nearest_even_with_subnormals(case):
    """Scale exactly 1 (the group's amax is 448): the codes are the values rounded as torch rounds them, through ties,
    mantissa carries into the next power of two, and the subnormals below 2^-6."""
    from lm_torch.kernels.fp8_gemm import quantize_per_token_group

    values = [448.0, 1.0625, 1.1875, 17.0, 19.0, 31.6, -126.3, 7.9, 0.75 * 2**-9, 2**-10, 3 * 2**-10, 0.0155, -300.0]
    x = torch.zeros(1, 32)
    x[0, : len(values)] = torch.tensor(values)
    x_q, scale = quantize_per_token_group(x.to(case.device, torch.float32), group=32)
    assert scale.item() == 1.0
    want = x.to(torch.float8_e4m3fn)
    assert torch.equal(x_q.cpu().view(torch.uint8), want.view(torch.uint8)), (x_q.float(), want.float())


@pytest.mark.parametrize(
    ("rows", "parts", "k", "bias"),
    [(1, [200], 300, False), (5, [192, 96, 96], 192, True), (33, [130], 256, False), (33, [320, 320], 320, True)],
)
def test_block_gemm_matches_the_dequantized_operands(case, rows, parts, k, bias):
    from lm_torch.kernels.fp8_gemm import fp8_block_gemm, quantize_per_token_group

    x = _activations(case, rows, k, seed=rows + k)
    x_q, x_scale = quantize_per_token_group(x)
    weight, w_scale, w_rows, w_dense = _fused_weight(parts, k, case.device, seed=k)
    n = weight.shape[0]
    b = case.randn(n, generator=torch.Generator().manual_seed(1)) if bias else None
    block_n = 32 if case.device == "cpu" else 64
    out = fp8_block_gemm(x_q, x_scale, weight, w_scale, w_rows, b, case.dtype, block_n=block_n)
    assert out.dtype == case.dtype and out.shape == (rows, n)
    want = _dequantized_activations(x_q, x_scale) @ w_dense.t()
    if b is not None:
        want = want + b.float().cpu()
    error = (out.float().cpu() - want).norm() / want.norm()
    assert error < 1e-2, f"relative error {error:.3g}"
    # float32 sums of the same products: far tighter than the bound wherever the output is float32
    if case.dtype == torch.float32:
        assert error < 1e-5, f"relative error {error:.3g}"


def test_k_steps_smaller_than_the_group_give_the_same_product(case):
    from lm_torch.kernels.fp8_gemm import fp8_block_gemm, quantize_per_token_group

    x_q, x_scale = quantize_per_token_group(_activations(case, 5, 300, seed=3))
    weight, w_scale, w_rows, _ = _fused_weight([150], 300, case.device, seed=4)
    whole = fp8_block_gemm(x_q, x_scale, weight, w_scale, w_rows, None, torch.float32)
    halves = fp8_block_gemm(x_q, x_scale, weight, w_scale, w_rows, None, torch.float32, block_k=64)
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)


def test_block_linear_is_close_to_the_float_product(case):
    """Quantizing the activations and the weights costs about e4m3's precision (3 mantissa bits) per operand."""
    from lm_torch.kernels.fp8_gemm import fp8_block_linear

    x = _activations(case, 5, 300, seed=5)
    weight, w_scale, w_rows, w_dense = _fused_weight([192, 64], 300, case.device, seed=6)
    out = fp8_block_linear(x.contiguous(), weight, w_scale, w_rows, None)
    want = x.float().cpu() @ w_dense.t()
    assert out.dtype == x.dtype
    assert (out.float().cpu() - want).norm() / want.norm() < 0.05


def test_bad_operands_are_refused(case):
    from lm_torch.kernels.fp8_gemm import fp8_block_gemm, quantize_per_token_group

    x_q, x_scale = quantize_per_token_group(torch.ones(2, 256, device=case.device))
    weight, w_scale, w_rows, _ = _fused_weight([64], 256, case.device, seed=0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_gemm(x_q.float(), x_scale, weight, w_scale, w_rows, None, torch.float32)
    with pytest.raises(ValueError, match="groups"):
        fp8_block_gemm(x_q, x_scale[:, :1], weight, w_scale, w_rows, None, torch.float32)
    with pytest.raises(ValueError, match="one scale row per output"):
        fp8_block_gemm(x_q, x_scale, weight, w_scale, w_rows[:10], None, torch.float32)
    with pytest.raises(ValueError, match="divide the group"):
        fp8_block_gemm(x_q, x_scale, weight, w_scale, w_rows, None, torch.float32, block_k=96)
    with pytest.raises(ValueError, match="power of two"):
        quantize_per_token_group(torch.ones(2, 256, device=case.device), group=100)
