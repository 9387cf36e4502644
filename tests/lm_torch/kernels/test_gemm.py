"""The tiled and transposed-cuBLAS GEMMs against the float32 reference, and the tuning table that picks the kernels."""

from __future__ import annotations

import json

import pytest
import torch

from lm_torch.kernels import reference


@pytest.mark.parametrize(("m", "n", "k"), [(2, 70, 300), (40, 128, 256), (130, 96, 512)])
def test_tiled_gemm_matches_reference(case, m, n, k):
    from lm_torch.kernels.gemm import tiled_gemm

    gen = torch.Generator().manual_seed(m * n * k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    # Several row and feature tiles, with partial ones (masked rows, features and K) at these sizes.
    tiles = {"block_m": 32, "block_n": 32, "block_k": 32} if case.device == "cpu" else {"block_m": 64, "block_n": 64}
    out = tiled_gemm(x, weight, **tiles)
    assert out.shape == (m, n) and out.dtype == x.dtype
    case.assert_close(out, reference.linear(x, weight), case.elementwise_tol)


def test_tiled_gemm_rejects_bad_shapes(case):
    from lm_torch.kernels.gemm import tiled_gemm

    gen = torch.Generator()
    with pytest.raises(ValueError, match="tiled_gemm"):
        tiled_gemm(case.randn(2, 8, generator=gen), case.randn(4, 9, generator=gen))
    with pytest.raises(ValueError, match="tiled_gemm"):
        tiled_gemm(case.randn(8, generator=gen), case.randn(4, 8, generator=gen))


@pytest.mark.parametrize(("m", "n", "k"), [(2, 70, 300), (130, 96, 512)])
def test_transposed_cublas_gemm_matches_reference(case, m, n, k):
    from lm_torch.kernels.gemm import transposed_cublas_gemm

    gen = torch.Generator().manual_seed(m + n + k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    out = transposed_cublas_gemm(x, weight)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous()
    case.assert_close(out, reference.linear(x, weight), case.elementwise_tol)


def test_transposed_cublas_gemm_rejects_bad_shapes(case):
    from lm_torch.kernels.gemm import transposed_cublas_gemm

    gen = torch.Generator()
    with pytest.raises(ValueError, match="transposed_cublas_gemm"):
        transposed_cublas_gemm(case.randn(2, 8, generator=gen), case.randn(4, 9, generator=gen))
    with pytest.raises(ValueError, match="transposed_cublas_gemm"):
        transposed_cublas_gemm(case.randn(8, generator=gen), case.randn(4, 8, generator=gen))


def _tables(gemm_tuning, device_name=None):
    from lm_torch.config import KernelConfig
    from lm_torch.kernels.tuning import TuningTables

    return TuningTables.load(KernelConfig(gemm_tuning=gemm_tuning), device_name)


def test_gemm_launch_reads_the_tuning_table(tmp_path):
    from lm_torch.kernels import gemm
    from lm_torch.kernels.gemv import skinny_gemm

    skinny = {"kernel": "skinny", "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4, "split_k": 1}
    tiled = {"kernel": "tiled", "block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}
    cublas_t = {"kernel": "cublas_t"}
    table = {"8:4096:1024": skinny, "32:4096:1024": None, "128:4096:1024": tiled, "256:4096:1024": cublas_t}
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"configs": table}))
    tables = _tables(str(path))
    skinny_args = {key: value for key, value in skinny.items() if key != "kernel"}
    assert gemm.gemm_launch(2, 4096, 1024, tuning=tables) == (
        skinny_gemm,
        skinny_args,
    )  # the fewest measured rows at or above
    assert gemm.gemm_launch(8, 4096, 1024, tuning=tables) == (skinny_gemm, skinny_args)
    assert gemm.gemm_launch(9, 4096, 1024, tuning=tables) is None  # cuBLAS won at 32 rows
    kernel, args = gemm.gemm_launch(100, 4096, 1024, tuning=tables)
    assert kernel is gemm.tiled_gemm and args["block_m"] == 128 and "kernel" not in args
    assert gemm.gemm_launch(200, 4096, 1024, tuning=tables) == (gemm.transposed_cublas_gemm, {})
    assert gemm.gemm_launch(257, 4096, 1024, tuning=tables) is None  # more rows than measured
    assert gemm.gemm_launch(8, 4096, 2048, tuning=tables) is None  # a shape the table lacks
    tables = _tables("none")
    assert gemm.gemm_launch(8, 4096, 1024, tuning=tables) is None
    with pytest.raises(ValueError, match=r"KernelConfig.gemm_tuning=.*missing\.json.* is not a file"):
        _tables(str(tmp_path / "missing.json"))  # a mistyped path is an error
    # A table that names the card it was measured on applies to that card only.
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "configs": table}))
    tables = _tables(str(measured), "NVIDIA A100-SXM4-80GB")
    assert gemm.gemm_launch(8, 4096, 1024, tuning=tables) is None
    tables = _tables(str(measured), "NVIDIA H100 80GB HBM3")
    assert gemm.gemm_launch(8, 4096, 1024, tuning=tables) == (skinny_gemm, skinny_args)
    bad_launches = (
        {"kernel": "tiled", "block_m": 64},
        {"kernel": "mystery"},
        {**skinny, "block_m": 1},
        {"kernel": "cublas_t", "block_n": 64},
    )
    for bad in bad_launches:
        bad_path = tmp_path / "bad.json"
        bad_path.write_text(json.dumps({"configs": {"8:4096:1024": bad}}))
        gemm.load_gemm_table.cache_clear()
        with pytest.raises(ValueError, match="must be null or name a kernel"):
            _tables(str(bad_path))
    for bad_key in ("8x4096", "8:4096:1024:relu", "8:4096:1024:silu:1"):
        bad_path.write_text(json.dumps({"configs": {bad_key: None}}))
        gemm.load_gemm_table.cache_clear()
        with pytest.raises(ValueError, match="rows:N:K"):
            _tables(str(bad_path))
    for gated in (skinny, cublas_t):
        bad_path.write_text(json.dumps({"configs": {"8:4096:1024:silu": gated}}))
        gemm.load_gemm_table.cache_clear()
        with pytest.raises(ValueError, match="only the tiled and TMA kernels"):
            _tables(str(bad_path))


def test_gemm_launch_gated_entries(tmp_path):
    from lm_torch.kernels import gemm

    tiled = {"kernel": "tiled", "block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"configs": {"64:8192:1024:silu": tiled, "64:8192:1024": None}}))
    tables = _tables(str(path))
    kernel, args = gemm.gemm_launch(40, 8192, 1024, "silu", tuning=tables)
    assert kernel is gemm.tiled_gemm and args["activation"] == "silu" and args["block_m"] == 64
    assert gemm.gemm_launch(40, 8192, 1024, tuning=tables) is None  # the plain product: cuBLAS
    assert gemm.gemm_launch(40, 8192, 1024, "gelu", tuning=tables) is None  # another activation: not measured
    launch = {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 4}
    tma = {"kernel": "tma", **launch}
    path.write_text(json.dumps({"configs": {"256:8192:1024": tma}}))  # the TMA kernel's split_k is missing
    gemm.load_gemm_table.cache_clear()
    with pytest.raises(ValueError, match="must be null or name a kernel"):
        _tables(str(path))
    configs = {"256:8192:1024:silu": {**tma, "split_k": 1}, "256:8192:1024": {**tma, "split_k": 2}}
    path.write_text(json.dumps({"configs": configs}))
    gemm.load_gemm_table.cache_clear()
    tables = _tables(str(path))
    assert gemm.gemm_launch(200, 8192, 1024, "silu", tuning=tables) == (
        gemm.tma_gemm,
        {**launch, "split_k": 1, "activation": "silu"},
    )
    assert gemm.gemm_launch(200, 8192, 1024, tuning=tables) == (gemm.tma_gemm, {**launch, "split_k": 2})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_batch_linear_gated_projection(dtype, tmp_path):
    from lm_torch.layers.activation import GatedActivation, gated_projection
    from lm_torch.layers.context import BuildContext
    from lm_torch.layers.linear import Linear

    tiled = {"kernel": "tiled", "block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"configs": {"64:384:256:silu": tiled}}))
    ctx = BuildContext(device=torch.device("cuda"), dtype=dtype, tuning=_tables(str(path)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(256, 384, False, ctx)).to("cuda", dtype)
    inputs = [torch.randn(rows, 256, device="cuda", dtype=dtype) for rows in (1, 37, 100)]
    expected = [
        reference.gated_activation(torch.nn.functional.linear(x, model[0].weight), "silu").float() for x in inputs
    ]
    assert model[0].forward_gated(inputs[0], "silu") is None  # one row: the GEMV, then the activation
    assert model[0].forward_gated(inputs[1], "silu") is not None  # 37 rows: the tiled kernel, fused
    assert model[0].forward_gated(inputs[2], "silu") is None  # more rows than the table measured: cuBLAS
    for x, want in zip(inputs, expected, strict=True):
        got = gated_projection(model[0], x, GatedActivation("silu", ctx)).float()
        torch.testing.assert_close(got, want, atol=2e-2 * (1 + want.abs().max().item()), rtol=0)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(("m", "intermediate", "k"), [(3, 40, 96), (70, 64, 128)])
def test_tiled_gemm_gated_matches_projection_then_activation(case, act, m, intermediate, k):
    from lm_torch.kernels.gemm import tiled_gemm

    gen = torch.Generator().manual_seed(m * intermediate + k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(2 * intermediate, k, generator=gen, scale=0.1)  # [gate | up]
    tiles = {"block_m": 32, "block_n": 32, "block_k": 32} if case.device == "cpu" else {"block_m": 64, "block_n": 64}
    out = tiled_gemm(x, weight, activation=act, **tiles)
    assert out.shape == (m, intermediate) and out.dtype == x.dtype
    # The unfused path: the projection rounded to the activation dtype, then the activation's own reference.
    gate_up = reference.linear(x, weight).to(x.dtype)
    case.assert_close(out, reference.gated_activation(gate_up, act), case.elementwise_tol)


def test_tiled_gemm_gated_rejects_bad_input(case):
    from lm_torch.kernels.gemm import tiled_gemm

    gen = torch.Generator()
    with pytest.raises(ValueError, match="activation 'relu'"):
        tiled_gemm(case.randn(2, 8, generator=gen), case.randn(4, 8, generator=gen), activation="relu")
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        tiled_gemm(case.randn(2, 8, generator=gen), case.randn(5, 8, generator=gen), activation="silu")


# The TMA kernel: several row and feature tiles with partial ones (rows, features and K past the tensors' ends,
# which the copy engine fills with zeros), with and without a split of K (3 splits: 2 of a full range, 1 short).
TMA_TILES_CPU = {"block_m": 32, "block_n": 32, "block_k": 32}
TMA_TILES_GPU = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4}


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize(("m", "n", "k"), [(2, 72, 320), (40, 128, 256), (130, 96, 512)])
def test_tma_gemm_matches_reference(case, m, n, k, split_k):
    from lm_torch.kernels.gemm import tma_gemm

    gen = torch.Generator().manual_seed(m * n * k + split_k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    tiles = TMA_TILES_CPU if case.device == "cpu" else TMA_TILES_GPU
    out = tma_gemm(x, weight, split_k=split_k, **tiles)
    assert out.shape == (m, n) and out.dtype == x.dtype
    case.assert_close(out, reference.linear(x, weight), case.elementwise_tol)
    # Twice more: the split counters were left at zero and the shared partial buffer is reused.
    case.assert_close(tma_gemm(x, weight, split_k=split_k, **tiles), out, 0.0)
    y = case.randn(m, k, generator=gen)
    case.assert_close(tma_gemm(y, weight, split_k=split_k, **tiles), reference.linear(y, weight), case.elementwise_tol)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(("m", "intermediate", "k"), [(3, 40, 96), (70, 64, 128)])
def test_tma_gemm_gated_matches_projection_then_activation(case, act, m, intermediate, k, split_k):
    from lm_torch.kernels.gemm import tma_gemm

    gen = torch.Generator().manual_seed(m * intermediate + k + split_k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(2 * intermediate, k, generator=gen, scale=0.1)  # [gate | up]
    tiles = TMA_TILES_CPU if case.device == "cpu" else TMA_TILES_GPU
    out = tma_gemm(x, weight, activation=act, split_k=split_k, **tiles)
    assert out.shape == (m, intermediate) and out.dtype == x.dtype
    gate_up = reference.linear(x, weight).to(x.dtype)
    case.assert_close(out, reference.gated_activation(gate_up, act), case.elementwise_tol)


def test_tma_gemm_takes_unaligned_rows_and_rejects_bad_input(case):
    from lm_torch.kernels.gemm import tma_gemm

    gen = torch.Generator().manual_seed(5)
    tiles = TMA_TILES_CPU if case.device == "cpu" else TMA_TILES_GPU
    weight = case.randn(48, 64, generator=gen, scale=0.05)
    wide = case.randn(7, 72, generator=gen)
    x = wide[:, :64]  # rows 72 elements apart: aligned; then a view starting 1 element in: not
    case.assert_close(tma_gemm(x, weight, **tiles), reference.linear(x, weight), case.elementwise_tol)
    shifted = wide.flatten()[1:449].view(7, 64)
    out = tma_gemm(shifted, weight, **tiles)  # copied to an aligned buffer first
    case.assert_close(out, reference.linear(shifted, weight), case.elementwise_tol)
    with pytest.raises(ValueError, match="tma_gemm"):
        tma_gemm(case.randn(2, 8, generator=gen), case.randn(4, 9, generator=gen))
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma_gemm(case.randn(2, 62, generator=gen), case.randn(4, 62, generator=gen))  # rows of 124 / 248 bytes
    with pytest.raises(ValueError, match="activation 'relu'"):
        tma_gemm(case.randn(2, 8, generator=gen), case.randn(4, 8, generator=gen), activation="relu")
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        tma_gemm(case.randn(2, 8, generator=gen), case.randn(5, 8, generator=gen), activation="silu")
