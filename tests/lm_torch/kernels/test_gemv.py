"""The one-row GEMV against the float32 reference, and `SmallBatchLinear` (which calls it) against nn.Linear."""

from __future__ import annotations

import json

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
def test_small_batch_linear_method(dtype, tmp_path, monkeypatch):
    from lm_torch.config import KernelConfig
    from lm_torch.kernels import gemm
    from lm_torch.kernels.tuning import TuningTables
    from lm_torch.layers.context import BuildContext
    from lm_torch.layers.cuda_linear import SmallBatchLinearMethod
    from lm_torch.layers.linear import Linear

    # A tuning table: the skinny GEMM for up to 8 rows of the first layer's shape, the tiled one up to 16 rows of
    # the second's, cuBLAS beyond.
    skinny = {"kernel": "skinny", "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "split_k": 1}
    tiled = {"kernel": "tiled", "block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    table = {"8:520:256": skinny, "16:64:520": tiled, "32:64:520": None}
    (tmp_path / "t.json").write_text(json.dumps({"configs": table}))
    tables = TuningTables.load(KernelConfig(gemm_tuning=str(tmp_path / "t.json")))
    calls = []

    def recorded(kernel, label):  # the real kernel, its launches noted
        def run(*args, **kwargs):
            calls.append(label)
            return kernel(*args, **kwargs)

        return run

    monkeypatch.setattr(gemm, "skinny_gemm", recorded(gemm.skinny_gemm, "skinny_gemm"))
    monkeypatch.setattr(gemm, "tiled_gemm", recorded(gemm.tiled_gemm, "tiled_gemm"))
    torch.manual_seed(0)
    ctx = BuildContext(device=torch.device("cuda"), dtype=dtype, tuning=tables)
    model = torch.nn.Sequential(Linear(256, 520, True, ctx), Linear(520, 64, False, ctx)).to("cuda", dtype)
    assert all(isinstance(m.method, SmallBatchLinearMethod) for m in model)
    inputs = [torch.randn(rows, 256, device="cuda", dtype=dtype) for rows in (1, 5, 9, 20)]
    expected = [
        torch.nn.functional.linear(
            torch.nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight
        ).float()
        for x in inputs
    ]
    # One row: the GEMV; 5 rows: skinny, tiled; 9: cuBLAS, tiled; 20: cuBLAS in both.
    for x, want in zip(inputs, expected, strict=True):
        got = model(x).float()
        torch.testing.assert_close(got, want, atol=2e-2 * (1 + want.abs().max().item()), rtol=0)
    assert calls == ["skinny_gemm", "tiled_gemm", "tiled_gemm"]
    assert model(torch.empty(0, 256, device="cuda", dtype=dtype)).shape == (0, 64)  # no rows: cuBLAS, no launch
    assert len(calls) == 3


@pytest.mark.parametrize(("m", "n", "k"), [(2, 70, 300), (5, 128, 256), (16, 96, 512), (33, 64, 128)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_skinny_gemm_matches_reference(case, m, n, k, split_k):
    from lm_torch.kernels.gemv import skinny_gemm

    gen = torch.Generator().manual_seed(m * n * k + split_k)
    x = case.randn(m, k, generator=gen)
    weight = case.randn(n, k, generator=gen, scale=0.05)
    # On the CPU small tiles (the interpreter's time); N and K not multiples of them take the masked loads.
    block_n, block_k = (32, 64) if case.device == "cpu" else (64, 128)
    out = skinny_gemm(x, weight, block_n=block_n, block_k=block_k, split_k=split_k)
    assert out.shape == (m, n) and out.dtype == x.dtype
    case.assert_close(out, reference.linear(x, weight), case.elementwise_tol)


def test_skinny_gemm_rejects_bad_shapes(case):
    from lm_torch.kernels.gemv import skinny_gemm

    gen = torch.Generator()
    with pytest.raises(ValueError, match="skinny_gemm"):
        skinny_gemm(case.randn(2, 8, generator=gen), case.randn(4, 9, generator=gen))
    with pytest.raises(ValueError, match="skinny_gemm"):
        skinny_gemm(case.randn(8, generator=gen), case.randn(4, 8, generator=gen))
