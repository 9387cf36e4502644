"""W4A16 kernels (GEMV and dequantizing GEMM) against the float32 dequantize-and-multiply reference, and the AWQ and
GPTQ layers' repacking into the kernel layout against the layers' own checkpoint dequantization (which
tests/lm_torch/test_quant_layers.py checks against independently packed checkpoints)."""

from __future__ import annotations

import os

import pytest
import torch

from lm_torch.kernels import reference

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by conftest.py without CUDA

# (N, K, group_size): N not a multiple of the tile; groups smaller than, equal to and larger than a K step.
CPU_SHAPES = [(48, 256, 32), (40, 256, 64), (33, 512, 128), (24, 384, 384), (16, 64, 16), (24, 512, 32)]
GPU_SHAPES = [(1000, 4096, 128), (4096, 14336, 128), (520, 1024, 64), (256, 512, 32)]


def _weights(case, n, k, group, seed):
    """Random packed 4-bit weights with zeros in [0, 16] and scales that keep outputs of order one."""
    from lm_torch.kernels.w4a16 import pack_int4

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (0.5 + torch.rand(k // group, n, generator=gen)) / (4.6 * k**0.5)
    zeros = torch.randint(0, 17, (k // group, n), generator=gen).float()
    return (
        pack_int4(q, group).to(case.device),
        scales.to(case.device, case.dtype),
        zeros.to(case.device, case.dtype),
        gen,
    )


def _shapes(case):
    return CPU_SHAPES if case.device == "cpu" else GPU_SHAPES


@pytest.mark.parametrize("group", [16, 64, 128, 256])
def test_pack_int4_round_trips(group):
    from lm_torch.kernels.w4a16 import pack_int4

    q = torch.randint(0, 16, (5, 512), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q, group)
    assert packed.dtype == torch.int32 and packed.shape == (5, 64)
    assert torch.equal(reference.unpack_int4(packed, group), q)
    # Word j of a block of B = min(group, 128) inputs holds inputs t * B / 8 + j in bits 4t .. 4t + 3.
    step = min(group, 128) // 8
    word = int(packed[0, 1])
    assert [(word >> (4 * t)) & 0xF for t in range(8)] == [int(q[0, 1 + t * step]) for t in range(8)]


def test_group_sizes_the_layout_cannot_block_are_refused():
    from lm_torch.kernels.w4a16 import pack_int4

    with pytest.raises(ValueError, match="group_size"):
        pack_int4(torch.zeros(4, 96, dtype=torch.int64), 24)
    with pytest.raises(ValueError, match="group_size"):
        pack_int4(torch.zeros(4, 384, dtype=torch.int64), 192)


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(case, split_k):
    from lm_torch.kernels.w4a16 import w4a16_gemv

    for index, (n, k, group) in enumerate(_shapes(case)):
        packed, scales, zeros, gen = _weights(case, n, k, group, seed=index)
        x = case.randn(1, k, generator=gen)
        expected = reference.w4a16_linear(x, packed, scales, zeros, group)
        num_blocks = k // min(group, 128)
        for blocks in (1, 2, 4):
            if num_blocks % blocks:
                continue
            for prefetch, prefetch_x in ((True, True), (True, False), (False, False)):
                out = w4a16_gemv(
                    x,
                    packed,
                    scales,
                    zeros,
                    group,
                    blocks=blocks,
                    split_k=split_k,
                    prefetch=prefetch,
                    prefetch_x=prefetch_x,
                )
                assert out.shape == (1, n) and out.dtype == x.dtype
                case.assert_close(out, expected, case.elementwise_tol)


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_tc_matches_reference(case, split_k):
    """The tensor-core GEMV: groups of 64 and more, N not a multiple of the tile, 1-4 blocks a step, split-K."""
    from lm_torch.kernels.w4a16 import w4a16_gemv_tc

    for index, (n, k, group) in enumerate(s for s in _shapes(case) if s[2] >= 64):
        packed, scales, zeros, gen = _weights(case, n, k, group, seed=30 + index)
        x = case.randn(1, k, generator=gen)
        expected = reference.w4a16_linear(x, packed, scales, zeros, group)
        num_blocks = k // min(group, 128)
        for block_n, blocks, prefetch in ((16, 1, True), (32, 2, True), (16, 4, True), (64, 1, False), (16, 2, False)):
            if num_blocks % blocks:
                continue
            out = w4a16_gemv_tc(
                x, packed, scales, zeros, group, block_n=block_n, blocks=blocks, split_k=split_k, prefetch=prefetch
            )
            assert out.shape == (1, n) and out.dtype == x.dtype
            case.assert_close(out, expected, case.elementwise_tol)
        # One step of weights loaded ahead instead of two.
        out = w4a16_gemv_tc(x, packed, scales, zeros, group, block_n=32, split_k=split_k, preload=1)
        case.assert_close(out, expected, case.elementwise_tol)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gemv_tc_gated_matches_gemv_then_activation(case, act, split_k):
    """A fused [gate | up] projection with the activation in the GEMV's last step: act(gate) * up of the reference
    product, with gate and up rounded to the activation dtype first (what the two separate kernels compute).
    Intermediate sizes that fill the last block of outputs partly (N / 2 = 40, 1000) and exactly (4096)."""
    from lm_torch.kernels.w4a16 import w4a16_gemv_tc, w4a16_linear

    sizes = ((80, 512, 64), (64, 512, 128)) if case.device == "cpu" else ((2000, 4096, 128), (8192, 4096, 128))
    for index, (n, k, group) in enumerate(sizes):
        packed, scales, zeros, gen = _weights(case, n, k, group, seed=70 + index)
        x = case.randn(1, k, generator=gen)
        product = reference.w4a16_linear(x, packed, scales, zeros, group).to(case.dtype)  # the GEMV's output
        expected = reference.gated_activation(product, act)
        for block_n, blocks in ((32, 2), (16, 1), (64, 1)):
            out = w4a16_gemv_tc(
                x, packed, scales, zeros, group, block_n=block_n, blocks=blocks, split_k=split_k, activation=act
            )
            assert out.shape == (1, n // 2) and out.dtype == x.dtype
            # The product's own rounding error is carried through act(gate) * up: twice the elementwise tolerance.
            case.assert_close(out, expected, 2 * case.elementwise_tol)
        # Through the dispatcher: the tuned GEMV where there is one, else the GEMV then the activation kernel.
        case.assert_close(
            w4a16_linear(x, packed, scales, zeros, group, activation=act), expected, 2 * case.elementwise_tol
        )
    with pytest.raises(ValueError, match="activation"):
        w4a16_gemv_tc(x, packed, scales, zeros, group, activation="relu")


@pytest.mark.parametrize("split_k", [1, 4])
def test_gemv_tc_rotary_matches_gemv_then_rotary(case, split_k):
    """A [q | k | v] projection of one token whose last step rotates q and k and writes k and v into the cache:
    the reference product rounded to the activation dtype (the GEMV's output), then rotary and the cache store of
    `kernels.reference`. A negative slot (a padding row) writes nothing; the dispatcher gives the same result."""
    from lm_torch.kernels.w4a16 import QKVRotary, w4a16_gemv_tc, w4a16_linear

    heads, kv_heads, dim, k, group = (4, 2, 32, 512, 64) if case.device == "cpu" else (32, 8, 128, 4096, 128)
    n = (heads + 2 * kv_heads) * dim
    packed, scales, zeros, gen = _weights(case, n, k, group, seed=90 + split_k)
    x = case.randn(1, k, generator=gen)
    angles = torch.rand(40, dim // 2, generator=gen) * 6.0
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(case.device)  # [positions, head_dim], halves repeated
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(case.device)
    positions = torch.tensor([29], device=case.device)
    qkv = reference.w4a16_linear(x, packed, scales, zeros, group).to(case.dtype).view(1, -1, dim)
    q, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    expected_q = reference.rotary(positions, q, cos, sin)
    expected_k = reference.rotary(positions, key, cos, sin)
    for slot in (21, -1):
        slots = torch.tensor([slot], device=case.device)
        caches = [torch.zeros(4, 16, kv_heads, dim, device=case.device, dtype=case.dtype) for _ in range(2)]
        expected_caches = [c.clone() for c in caches]
        reference.store_kv_cache(expected_k, value, *expected_caches, slots)
        rope = QKVRotary(positions, cos, sin, caches[0], caches[1], slots, heads, kv_heads, dim)
        for block_n in (32, 16):
            for c in caches:
                c.zero_()
            out = w4a16_gemv_tc(
                x, packed, scales, zeros, group, block_n=block_n, blocks=2, split_k=split_k, rotary=rope
            )
            assert out.shape == (1, n) and out.dtype == x.dtype
            rows = out.view(1, -1, dim)
            case.assert_close(rows[:, :heads], expected_q, 2 * case.elementwise_tol)
            case.assert_close(rows[:, heads : heads + kv_heads], expected_k, 2 * case.elementwise_tol)
            case.assert_close(rows[:, heads + kv_heads :], value, case.elementwise_tol)
            for cache, expected in zip(caches, expected_caches, strict=True):
                case.assert_close(cache, expected, 2 * case.elementwise_tol)
        for c in caches:
            c.zero_()
        case.assert_close(
            w4a16_linear(x, packed, scales, zeros, group, rotary=rope).view(1, -1, dim)[:, :heads],
            expected_q,
            2 * case.elementwise_tol,
        )
        for cache, expected in zip(caches, expected_caches, strict=True):
            case.assert_close(cache, expected, 2 * case.elementwise_tol)
    with pytest.raises(ValueError, match="head_dim"):
        w4a16_gemv_tc(x, packed, scales, zeros, group, block_n=64 if dim == 32 else 256, rotary=rope)


def test_gemv_tc_split_k_calls_in_a_row(case):
    """Split-K reduces in the kernel: the last split of a row block writes the output and resets its counter, so calls
    in a row (other split counts, other inputs, a wider N that needs more counters) each get their own result."""
    from lm_torch.kernels.w4a16 import w4a16_gemv_tc

    n, k, group = (40, 512, 64) if case.device == "cpu" else (4096, 4096, 128)
    packed, scales, zeros, gen = _weights(case, n, k, group, seed=50)
    wide = _weights(case, 4 * n, k, group, seed=51)
    for split_k in (2, 4, 2, 3):
        for weights in ((packed, scales, zeros), wide[:3]):
            x = case.randn(1, k, generator=gen)
            expected = reference.w4a16_linear(x, *weights, group)
            out = w4a16_gemv_tc(x, *weights, group, block_n=16, split_k=split_k)
            case.assert_close(out, expected, case.elementwise_tol)


@pytest.mark.skipif(not INTERPRETING, reason="the 16-bit path of the interpreter (GPU cases test it compiled)")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_gemv_tc_magic_halves_in_the_interpreter(dtype, tol):
    """The bf16 / fp16 path (nibbles ORed into the halves of MAGIC, the offset taken out per block) on the CPU: the
    same operands as on the GPU, but plain AND-OR for the inline PTX and, for bf16, the products in float32."""
    pytest.importorskip("triton")
    from lm_torch.kernels.w4a16 import pack_int4, w4a16_gemv_tc

    gen = torch.Generator().manual_seed(4)
    for n, k, group in ((33, 512, 128), (40, 512, 64), (24, 768, 384)):
        q = torch.randint(0, 16, (n, k), generator=gen)
        scales = ((0.5 + torch.rand(k // group, n, generator=gen)) / (4.6 * k**0.5)).to(dtype)
        zeros = torch.randint(0, 17, (k // group, n), generator=gen).to(dtype)
        packed = pack_int4(q, group)
        x = torch.randn(1, k, generator=gen).to(dtype)
        expected = reference.w4a16_linear(x, packed, scales, zeros, group)
        for split_k in (1, 2):
            out = w4a16_gemv_tc(x, packed, scales, zeros, group, block_n=16, split_k=split_k)
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 70])
def test_gemm_matches_reference(case, rows):
    from lm_torch.kernels.w4a16 import w4a16_gemm, w4a16_linear

    # The tile's weights enter the tensor-core product rounded to x's dtype, as in any dequantizing GEMM.
    tol = 2 * case.elementwise_tol
    for index, (n, k, group) in enumerate(_shapes(case)):
        packed, scales, zeros, gen = _weights(case, n, k, group, seed=10 + index)
        x = case.randn(rows, k, generator=gen)
        expected = reference.w4a16_linear(x, packed, scales, zeros, group)
        for split_k, prefetch in ((1, False), (2, False), (1, True), (3, True)):
            out = w4a16_gemm(
                x, packed, scales, zeros, group, block_m=16, block_n=32, split_k=split_k, prefetch=prefetch
            )
            case.assert_close(out, expected, tol)
        case.assert_close(w4a16_linear(x, packed, scales, zeros, group), expected, tol)


def test_dequantize_matches_reference(case):
    from lm_torch.kernels.w4a16 import w4a16_dequantize

    for index, (n, k, group) in enumerate(_shapes(case)):
        packed, scales, zeros, _ = _weights(case, n, k, group, seed=20 + index)
        q = reference.unpack_int4(packed, group).float()
        z = zeros.float().t().repeat_interleave(group, dim=1)
        s = scales.float().t().repeat_interleave(group, dim=1)
        dense = w4a16_dequantize(packed, scales, zeros, group, block_n=16)
        assert dense.dtype == scales.dtype and dense.shape == (n, k)
        assert torch.equal(dense, ((q - z) * s).to(scales.dtype))  # one rounding of the exact product, as here


def test_bad_shapes_are_refused(case):
    from lm_torch.kernels.w4a16 import w4a16_gemm, w4a16_gemv, w4a16_gemv_tc

    packed, scales, zeros, gen = _weights(case, 16, 128, 32, seed=0)
    x = case.randn(2, 128, generator=gen)
    with pytest.raises(ValueError, match="1"):
        w4a16_gemv(x, packed, scales, zeros, 32)
    with pytest.raises(ValueError, match="group_size"):
        w4a16_gemm(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="scales"):
        w4a16_gemm(x, packed, scales[:2], zeros, 32)
    with pytest.raises(ValueError, match="per step"):
        w4a16_gemv(x[:1], packed, scales, zeros, 32, blocks=3)
    with pytest.raises(ValueError, match="group_size 32"):  # blocks of 32 inputs: too few for its mma operand
        w4a16_gemv_tc(x[:1], packed, scales, zeros, 32)


def _random_layer(kind: str, case, in_features=256, out_features=96, group=32, act_order=False):
    from lm_torch.layers.context import BuildContext
    from lm_torch.layers.quant import AWQLinear, GPTQLinear

    gen = torch.Generator().manual_seed(3)
    # Built for the case's device: a layer picks its kernel path at construction (then moved there below).
    ctx = BuildContext(device=torch.device(case.device), dtype=case.dtype)
    if kind == "awq":
        layer = AWQLinear(in_features, out_features, bias=True, group_size=group, dtype=case.dtype, ctx=ctx)
    else:
        layer = GPTQLinear(in_features, out_features, bias=True, group_size=group, bits=4, dtype=case.dtype, ctx=ctx)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, layer.qweight.shape, generator=gen).to(torch.int32))
        layer.qzeros.copy_(torch.randint(-(2**31), 2**31 - 1, layer.qzeros.shape, generator=gen).to(torch.int32))
        layer.scales.copy_((0.5 + torch.rand(layer.scales.shape, generator=gen)) / (4.6 * in_features**0.5))
        layer.bias.copy_(torch.randn(out_features, generator=gen))
        if act_order:
            order = torch.randperm(in_features, generator=gen)
            layer.g_idx.copy_((torch.arange(in_features) // group)[order].to(torch.int32))
    return layer.to(case.device)


@pytest.mark.parametrize(("kind", "act_order"), [("awq", False), ("gptq", False), ("gptq", True)])
def test_layers_repack_into_the_kernel_layout(case, kind, act_order):
    layer = _random_layer(kind, case, act_order=act_order)
    dense = layer.dequantize().float()  # [in, out] from the checkpoint tensors
    gen = torch.Generator().manual_seed(5)
    inputs = [case.randn(1, 256, generator=gen), case.randn(2, 7, 256, generator=gen)]
    expected = [x.float() @ dense + layer.bias.float() for x in inputs]
    if case.device == "cpu":
        assert layer.repack_for_kernels()
    else:
        layer.finish_loading()  # CUDA: repacked at load time
    assert layer.packed is not None and not hasattr(layer, "qweight") and not hasattr(layer, "g_idx")
    assert (layer.input_perm is not None) == act_order
    assert torch.equal(layer.dequantize().float(), dense)
    for x, want in zip(inputs, expected, strict=True):
        got = layer(x)
        assert got.shape == want.shape and got.dtype == x.dtype
        case.assert_close(got, want, 2 * case.elementwise_tol)


def test_uneven_gptq_groups_keep_the_dense_path(case):
    layer = _random_layer("gptq", case, act_order=True)
    with torch.no_grad():
        layer.g_idx.copy_(torch.zeros_like(layer.g_idx))  # one group of all inputs: not group_size of them
    assert not layer.repack_for_kernels()
    assert layer.packed is None and hasattr(layer, "qweight")


def test_tuned_launch_shapes_are_used(case, tmp_path):
    """`w4a16_linear` takes a shape's launch parameters from the tuning table (here one naming kernels and
    parameters the defaults would not pick) and computes the same product."""
    import json

    from lm_torch.kernels import w4a16

    n, k, group = 40, 256, 64
    n_tc = 48  # a second shape for the tensor-core GEMV
    table = {
        f"1:{n}:{k}:{group}": {"kernel": "gemv", "block_n": 8, "blocks": 2, "num_warps": 1, "split_k": 2},
        f"1:{n_tc}:{k}:{group}": {"kernel": "gemv_tc", "block_n": 32, "blocks": 2, "num_warps": 1, "split_k": 2},
        f"16:{n}:{k}:{group}": {"kernel": "gemm", "block_m": 16, "block_n": 16, "split_k": 3, "prefetch": True},
        f"2048:{n}:{k}:{group}": {"kernel": "dequant", "block_n": 8},
    }
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"device": "test", "configs": table}))
    tables = _tables(str(path))
    assert w4a16.tuned_configs(tables) == table
    assert tables.w4a16_config(5, n, k, group) == table[f"16:{n}:{k}:{group}"]
    packed, scales, zeros, gen = _weights(case, n, k, group, seed=7)
    for rows in (1, 5, 70):
        x = case.randn(rows, k, generator=gen)
        expected = reference.w4a16_linear(x, packed, scales, zeros, group)
        out = w4a16.w4a16_linear(x, packed, scales, zeros, group, tuning=tables)
        case.assert_close(out, expected, 2 * case.elementwise_tol)
    packed, scales, zeros, gen = _weights(case, n_tc, k, group, seed=8)
    x = case.randn(1, k, generator=gen)
    expected = reference.w4a16_linear(x, packed, scales, zeros, group)
    case.assert_close(
        w4a16.w4a16_linear(x, packed, scales, zeros, group, tuning=tables), expected, case.elementwise_tol
    )


def _tables(w4a16_tuning):
    from lm_torch.config import KernelConfig
    from lm_torch.kernels.tuning import TuningTables

    return TuningTables.load(KernelConfig(w4a16_tuning=w4a16_tuning))


def test_tuning_table_none_and_missing_file(tmp_path):
    """`KernelConfig.w4a16_tuning` "none" runs the defaults; a named file that does not exist is an error naming the
    field, not a silent fall-back to the defaults."""
    from lm_torch.kernels import w4a16

    assert w4a16.tuned_configs(_tables("none")) == {}
    with pytest.raises(ValueError, match=r"KernelConfig.w4a16_tuning=.*missing\.json.* is not a file"):
        _tables(str(tmp_path / "missing.json"))
    assert w4a16.tuned_configs(_tables(None))  # the shipped table
    assert w4a16.tuned_configs() == w4a16.tuned_configs(_tables(None))
