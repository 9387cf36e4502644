"""Fused MoE: the token-to-expert sort against a plain-python construction, the kernel against the per-expert torch
reference (which is itself checked against the dense formula), launch configs, preallocated sort buffers and CUDA
graph capture."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lm_torch.kernels import reference

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by conftest.py without CUDA
COMPILED_GPU = torch.cuda.is_available() and not INTERPRETING
DEVICE = "cuda" if COMPILED_GPU else "cpu"
needs_gpu = pytest.mark.skipif(not COMPILED_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
needs_kernels = pytest.mark.skipif(not (COMPILED_GPU or INTERPRETING), reason="needs a CUDA GPU or TRITON_INTERPRET")

# Kernel against reference, elementwise |out - ref| <= tol * (1 + |ref|): both round at the same points, so the
# half-precision tolerances cover a rounding that the float32 sums' order tips the other way.
MOE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def _problem(m, num_experts, top_k, hidden, inter, *, dtype, device, seed, ids_dtype=torch.int64):
    """Random hidden states, experts scaled to outputs of order one, and a softmax top-k routing (renormalised)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / math.sqrt(inter)
    probs = torch.randn(m, num_experts, generator=gen).softmax(-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return (
        x.to(device, dtype),
        w13.to(device, dtype),
        w2.to(device, dtype),
        weights.to(device, torch.float32),
        ids.to(device, ids_dtype),
    )


def _assert_close(out, expected, dtype):
    out, expected = out.float().cpu(), expected.float().cpu()
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=MOE_TOL[dtype], rtol=MOE_TOL[dtype])


def _python_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """The sort built entry by entry: each expert's flat entries in order, padded with M * k to a multiple of
    block_m; then the unused slots (M * k) and blocks (-1) up to the capacity."""
    flat = ids.reshape(-1).tolist()
    num_ids = len(flat)
    slots, experts = [], []
    for expert in range(num_experts):
        entries = [i for i, e in enumerate(flat) if e == expert]
        if not entries:
            continue
        padded = -(-len(entries) // block_m) * block_m
        slots += entries + [num_ids] * (padded - len(entries))
        experts += [expert] * (padded // block_m)
    total = len(slots)
    capacity = min(num_ids * block_m, num_ids + num_experts * (block_m - 1))
    slots += [num_ids] * (capacity - total)
    experts += [-1] * (capacity // block_m - len(experts))
    return slots, experts, total


# ---------------------------------------------------------------------------------------------------------------------
# The reference.


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_reference_matches_dense_formula(activation):
    gen = torch.Generator().manual_seed(0)
    m, num_experts, top_k, hidden, inter = 5, 4, 2, 8, 6
    x = torch.randn(m, hidden, generator=gen, dtype=torch.float64)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, dtype=torch.float64)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 2], [2, 0], [3, 1], [3, 3], [1, 2]])  # row 3 names expert 3 twice: both count
    weights = torch.rand(m, top_k, generator=gen, dtype=torch.float64)
    # Every expert on every token, then the [M, E] matrix of routing weights picks and weighs them.
    gate = torch.einsum("mh,eih->emi", x, w13[:, :inter])
    up = torch.einsum("mh,eih->emi", x, w13[:, inter:])
    if activation == "silu":
        act = gate / (1 + torch.exp(-gate))
    else:
        act = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    experts_out = torch.einsum("emi,ehi->emh", act * up, w2)  # [E, M, H]
    routing = torch.zeros(m, num_experts, dtype=torch.float64).scatter_add_(1, ids, weights)
    dense = torch.einsum("me,emh->mh", routing, experts_out)
    out = reference.fused_moe(x.float(), w13.float(), w2.float(), weights.float(), ids, activation)
    assert out.dtype == torch.float32 and out.shape == (m, hidden)
    torch.testing.assert_close(out.double(), dense, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The sort.


@needs_kernels
@pytest.mark.parametrize("num_experts", [8, 64, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_align_matches_python(num_experts, top_k, m):
    from lm_torch.kernels.fused_moe import moe_align_block_size

    gen = torch.Generator().manual_seed(num_experts * 1000 + top_k * 100 + m)
    # Distinct experts per row (a router's top-k), skewed towards a few so that some runs span several blocks.
    scores = torch.rand(m, num_experts, generator=gen) * torch.linspace(1.0, 4.0, num_experts) ** 2
    ids = torch.topk(scores, top_k, dim=-1).indices
    ids_dtype = torch.int32 if m % 2 else torch.int64
    variants = [(16, True), (16, False)]
    if m == 17:  # other block sizes: runs of many blocks (4), and one block holding every run's entries (64)
        variants += [(4, True), (4, False), (64, True), (64, False)]
    for block_m, single in variants:
        sorted_ids, expert_ids, post_padded = moe_align_block_size(
            ids.to(DEVICE, ids_dtype), num_experts, block_m, single_program=single
        )
        slots, experts, total = _python_align(ids, num_experts, block_m)
        assert sorted_ids.dtype == expert_ids.dtype == post_padded.dtype == torch.int32
        assert sorted_ids.cpu().tolist() == slots, (block_m, single)
        assert expert_ids.cpu().tolist() == experts, (block_m, single)
        assert post_padded.cpu().tolist() == [total]


@needs_kernels
def test_align_gives_idle_experts_no_blocks():
    from lm_torch.kernels.fused_moe import moe_align_block_size

    # 17 rows routed only to experts 5 and 60 of 64: 17 entries each, two blocks of 16 each; nothing else.
    ids = torch.tensor([[5, 60]] * 17, dtype=torch.int32, device=DEVICE)
    for single in (True, False):
        sorted_ids, expert_ids, post_padded = moe_align_block_size(ids, 64, 16, single_program=single)
        assert int(post_padded) == 64
        assert expert_ids.cpu().tolist()[:4] == [5, 5, 60, 60]
        assert set(expert_ids.cpu().tolist()[4:]) == {-1}
        assert sorted_ids.cpu().tolist()[:32] == list(range(0, 34, 2)) + [34] * 15


# ---------------------------------------------------------------------------------------------------------------------
# The kernel against the reference.


@pytest.mark.parametrize("num_experts", [8, 64, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_fused_moe_matches_reference(case, num_experts, top_k, m):
    from lm_torch.kernels.fused_moe import fused_moe

    hidden, inter = (64, 32) if case.device == "cpu" else (256, 128)
    ids_dtype = torch.int32 if (m + top_k) % 2 else torch.int64
    seed = num_experts * 1000 + top_k * 100 + m
    x, w13, w2, weights, ids = _problem(
        m, num_experts, top_k, hidden, inter, dtype=case.dtype, device=case.device, seed=seed, ids_dtype=ids_dtype
    )
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.shape == (m, hidden) and out.dtype == case.dtype
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), case.dtype)


@pytest.mark.parametrize(
    "config",
    [
        # Several N tiles and K steps, a partial last N tile (I = 48, H = 80), masked K (80 = 2.5 x 32), groups.
        {"block_m": 16, "block_n": 16, "block_k": 16, "group_m": 1, "num_warps": 4, "num_stages": 2},
        {
            "block_m": 32,
            "block_n": 32,
            "block_k": 32,
            "group_m": 4,
            "num_warps": 4,
            "num_stages": 2,
            "w2": {"block_n": 64, "block_k": 16, "group_m": 2},
        },
        {"block_m": 64, "block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 2},
    ],
    ids=["16x16x16", "32x32x32-w2", "64x64x64"],
)
def test_fused_moe_launch_configs(case, config):
    from lm_torch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(37, 8, 2, 80, 48, dtype=case.dtype, device=case.device, seed=7)
    out = fused_moe(x, w13, w2, weights, ids, config=config)
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), case.dtype)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "gelu_pytorch_tanh"])
def test_fused_moe_activations(case, activation):
    from lm_torch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(9, 8, 2, 64, 32, dtype=case.dtype, device=case.device, seed=3)
    out = fused_moe(x, w13, w2, weights, ids, activation)
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids, activation), case.dtype)


def test_fused_moe_idle_experts_tied_weights_and_repeats(case):
    from lm_torch.kernels.fused_moe import fused_moe

    x, w13, w2, _, _ = _problem(17, 64, 4, 64, 32, dtype=case.dtype, device=case.device, seed=11)
    # Only experts 2, 9 and 40 of 64 are used; every weight is 1/4 (ties); some rows name one expert twice.
    rows = [[2, 9, 40, 9], [40, 2, 9, 40], [9, 9, 9, 9], [2, 40, 2, 40]]
    ids = torch.tensor([rows[i % 4] for i in range(17)], dtype=torch.int32, device=case.device)
    weights = torch.full((17, 4), 0.25, device=case.device)
    out = fused_moe(x, w13, w2, weights, ids)
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), case.dtype)
    # Zero weights: the routed outputs vanish.
    zeros = fused_moe(x, w13, w2, torch.zeros_like(weights), ids)
    assert torch.equal(zeros.float().cpu(), torch.zeros(17, 64))


def test_fused_moe_runs_long_batches_in_chunks(case, monkeypatch):
    from lm_torch.kernels import fused_moe as module

    monkeypatch.setattr(module, "CHUNK_TOKENS", 8)
    x, w13, w2, weights, ids = _problem(21, 8, 2, 64, 32, dtype=case.dtype, device=case.device, seed=5)
    out = module.fused_moe(x, w13, w2, weights, ids)
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), case.dtype)


def test_fused_moe_empty_batch_and_bad_arguments(case):
    from lm_torch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(3, 8, 2, 64, 32, dtype=case.dtype, device=case.device, seed=1)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 64)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, w13, w2, weights, ids, "relu")
    with pytest.raises(ValueError, match="w13"):
        fused_moe(x, w13, w2[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, weights, ids[:, :1])
    with pytest.raises(ValueError, match="block_m"):
        fused_moe(x, w13, w2, weights, ids, config={"block_m": 16})
    with pytest.raises(ValueError, match="power of two"):
        bad = {"block_m": 16, "block_n": 48, "block_k": 32, "group_m": 1, "num_warps": 4, "num_stages": 2}
        fused_moe(x, w13, w2, weights, ids, config=bad)


# ---------------------------------------------------------------------------------------------------------------------
# Preallocated buffers, launch configs and tuning tables.


def test_buffers_serve_every_batch_size(case):
    from lm_torch.kernels.fused_moe import MoEBuffers, default_config, fused_moe, moe_align_block_size

    buffers = MoEBuffers.allocate(32, 2, 8, torch.device(case.device))
    for m in (1, 5, 32):
        x, w13, w2, weights, ids = _problem(m, 8, 2, 64, 32, dtype=case.dtype, device=case.device, seed=m)
        config = default_config(m, 8, 2)
        out = fused_moe(x, w13, w2, weights, ids, config=config, buffers=buffers)
        assert torch.equal(out, fused_moe(x, w13, w2, weights, ids, config=config))  # same launches: same bits
        sort = moe_align_block_size(ids, 8, config["block_m"], buffers=buffers)
        assert sort[0].data_ptr() == buffers.sorted_token_ids.data_ptr()
        assert sort[1].data_ptr() == buffers.expert_ids.data_ptr()
        assert sort[2] is buffers.num_tokens_post_padded
        assert [t.cpu().tolist() for t in sort] == [t.cpu().tolist() for t in moe_align_block_size(ids, 8, 16)]
    x, w13, w2, weights, ids = _problem(33, 8, 2, 64, 32, dtype=case.dtype, device=case.device, seed=0)
    with pytest.raises(ValueError, match="33 rows"):
        fused_moe(x, w13, w2, weights, ids, buffers=buffers)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x[:4], w13, w2, weights[:4, :1], ids[:4, :1], buffers=buffers)


def test_default_config_by_tokens_per_expert():
    pytest.importorskip("triton")
    from lm_torch.kernels.fused_moe import CONFIG_KEYS, default_config, fused_moe_reference

    assert fused_moe_reference is reference.fused_moe  # the kernel module names the reference too
    decode = default_config(1, 128, 8)
    assert decode["block_m"] == 16 and sorted(decode) == sorted(CONFIG_KEYS)
    sizes = [default_config(m, 128, 8)["block_m"] for m in (1, 16, 64, 256, 1024, 8192)]
    assert sizes == sorted(sizes) and sizes[-1] == 128


def test_tuned_table_is_read(tmp_path):
    pytest.importorskip("triton")
    from lm_torch.kernels.fused_moe import default_config, launch_config, load_fused_moe_table

    small = {"block_m": 16, "block_n": 32, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 4}
    large = {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3}
    path = tmp_path / "moe.json"
    path.write_text(json.dumps({"device": None, "configs": {"8:32:64:float32": {"4": small, "64": large}}}))
    cpu = torch.device("cpu")
    assert launch_config(3, 8, 32, 64, 2, torch.float32, cpu, str(path)) == small
    assert launch_config(17, 8, 32, 64, 2, torch.float32, cpu, str(path)) == large
    assert launch_config(5000, 8, 32, 64, 2, torch.float32, cpu, str(path)) == large  # beyond the table: its last
    assert launch_config(3, 8, 32, 64, 2, torch.bfloat16, cpu, str(path)) == default_config(3, 8, 2)
    # A table measured on another card is left out; "none" is no table; a broken entry is refused.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"device": "Card A", "configs": {"8:32:64:float32": {"4": small}}}))
    assert load_fused_moe_table(str(other), "Card B") == {}
    assert load_fused_moe_table(str(other), "Card A")["8:32:64:float32"] == [(4, small)]
    assert load_fused_moe_table("none") == {}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"configs": {"8:32:64:float32": {"4": {"block_m": 16}}}}))
    with pytest.raises(ValueError, match=r"broken\.json"):
        load_fused_moe_table(str(broken))


# ---------------------------------------------------------------------------------------------------------------------
# Larger shapes and CUDA graphs on the GPU.


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_experts", "top_k", "hidden", "inter"),
    [(128, 8, 2048, 768), (8, 2, 1024, 1792), (64, 1, 512, 256)],
    ids=["qwen3-30b", "mixtral-like", "top1"],
)
@pytest.mark.parametrize("m", [1, 7, 64, 257, 1024, 8192])
def test_fused_moe_large_gpu(dtype, num_experts, top_k, hidden, inter, m):
    from lm_torch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(
        m, num_experts, top_k, hidden, inter, dtype=dtype, device="cuda", seed=m, ids_dtype=torch.int32
    )
    out = fused_moe(x, w13, w2, weights, ids)
    _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), dtype)


@pytest.mark.gpu
@needs_gpu
def test_fused_moe_cuda_graph_with_buffers():
    from lm_torch.kernels.fused_moe import MoEBuffers, fused_moe

    dtype, num_experts, top_k, hidden, inter = torch.bfloat16, 64, 8, 512, 256
    buffers = MoEBuffers.allocate(64, top_k, num_experts, torch.device("cuda"))
    graphs = {}
    for m in (1, 8, 64):  # one graph per batch size, every one on the same sort buffers
        x, w13, w2, weights, ids = _problem(
            m, num_experts, top_k, hidden, inter, dtype=dtype, device="cuda", seed=m, ids_dtype=torch.int32
        )
        fused_moe(x, w13, w2, weights, ids, buffers=buffers)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe(x, w13, w2, weights, ids, buffers=buffers)
        graphs[m] = (graph, x, w13, w2, weights, ids, out)
    for m, (graph, x, w13, w2, weights, ids, out) in graphs.items():
        # New routing and inputs in the captured tensors, then a replay.
        _, _, _, new_weights, new_ids = _problem(
            m, num_experts, top_k, hidden, inter, dtype=dtype, device="cuda", seed=100 + m, ids_dtype=torch.int32
        )
        x.copy_(torch.randn_like(x))
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), dtype)
