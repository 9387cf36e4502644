"""`TritonAttentionBackend` against `TorchAttentionBackend` on whole steps built by `StepMetadata.build`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lm_torch.attention import StepMetadata, TorchAttentionBackend, TritonAttentionBackend, triton_backend

BLOCK_SIZE = 16


def _inputs(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim):
    """A step's q, k, v [tokens, heads, head_dim], random caches and block tables (shuffled block ids)."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-ctx // BLOCK_SIZE) for ctx in context_lens]
    num_blocks = sum(used) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, first = [], 0
    for n in used:
        tables.append(order[first : first + n])
        first += n
    num_tokens = sum(query_lens)
    q = case.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = case.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = case.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    k_cache = case.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    v_cache = case.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    return q, k, v, k_cache, v_cache, tables


def _step(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim, sliding_window, softcap):
    """Run one step through both backends from identical caches; return (outputs, caches) of each."""
    q, k, v, k_cache, v_cache, tables = _inputs(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim)
    results = []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        caches = (k_cache.clone(), v_cache.clone())
        meta = StepMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, case.device)
        state = backend.prepare(meta)
        out = backend.forward(
            q, k, v, caches, state, scale=1 / math.sqrt(head_dim), sliding_window=sliding_window, softcap=softcap
        )
        results.append((out, caches))
    return results


@pytest.mark.parametrize(
    ("sliding_window", "softcap", "heads"),
    [(None, None, (8, 2)), (12, None, (4, 4)), (None, 8.0, (8, 1)), (10, 8.0, (6, 2))],
    ids=["gqa4", "window-mha", "softcap-mqa", "window-softcap-gqa3"],
)
def test_mixed_step_matches_torch_backend(case, sliding_window, softcap, heads):
    # Two decodes, a chunk after a cached prefix, a fresh prompt, and a one-token chunk of a prompt.
    query_lens = [1, 9, 1, 20, 1]
    context_lens = [37, 30, 5, 20, 18]
    (out, caches), (expected, expected_caches) = _step(
        case, 1, query_lens, context_lens, *heads, 32, sliding_window, softcap
    )
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    # The torch backend computes in dtype (SDPA) where the reference is float32: allow both their errors.
    case.assert_close(out, expected, 2 * case.attention_tol)


@pytest.mark.parametrize("sort", [False, True], ids=["arrival-order", "longest-first"])
def test_decode_step_matches_torch_backend(case, sort, monkeypatch):
    # `sort`: the decode programs start longest context first (what large batches do).
    monkeypatch.setattr(triton_backend, "SORT_MIN_DECODES", 1 if sort else 1 << 30)
    query_lens = [1] * 6
    context_lens = [1, 16, 17, 64, 100, 47]
    (out, caches), (expected, expected_caches) = _step(case, 2, query_lens, context_lens, 8, 2, 32, None, None)
    assert torch.equal(caches[0], expected_caches[0])
    case.assert_close(out, expected, 2 * case.attention_tol)


def test_padding_rows_of_an_eager_step_are_zeroed(case, monkeypatch):
    """An eager step's rows past `StepMetadata.num_real_tokens` (padding: slot -1, no sequence) come out zero,
    whatever the output's memory held (every `empty_like` here returns NaNs), and the real rows are those of the
    unpadded step."""
    query_lens, context_lens, pad = [1, 9, 1, 20], [37, 30, 5, 20], 5
    (expected, _), _ = _step(case, 3, query_lens, context_lens, 8, 2, 32, None, None)
    real = sum(query_lens)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    q, k, v, k_cache, v_cache, tables = _inputs(case, 3, query_lens, context_lens, 8, 2, 32)
    q, k, v = (torch.cat([t, torch.ones_like(t[:pad])]) for t in (q, k, v))  # padding rows after the real ones
    meta = StepMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, case.device)
    slots = torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((pad,), -1)])
    meta = dataclasses.replace(meta, slot_mapping=slots, num_real_tokens=real)
    backend = TritonAttentionBackend()
    out = backend.forward(q, k, v, (k_cache, v_cache), backend.prepare(meta), scale=1 / math.sqrt(32))
    torch.testing.assert_close(out[:real], expected, rtol=0, atol=0)
    assert out[real:].eq(0).all()


def test_backend_rejects_block_size_mismatch(case):
    pytest.importorskip("triton")
    meta = StepMetadata.build([1], [3], [[0]], 8, case.device)
    x = torch.ones(1, 2, 16, device=case.device, dtype=case.dtype)
    cache = torch.ones(2, 16, 2, 16, device=case.device, dtype=case.dtype)
    backend = TritonAttentionBackend()
    with pytest.raises(ValueError, match="block"):
        backend.forward(x, x, x, (cache, cache), backend.prepare(meta), scale=1.0)


def _write_table(path, configs, device=None, head_dim=128, kv_bytes=2):
    import json

    path.write_text(json.dumps({"device": device, "head_dim": head_dim, "kv_bytes": kv_bytes, "configs": configs}))
    return str(path)


def _plan(block_n, splits, split_tokens, sort):
    return {
        "block_n": block_n,
        "num_warps": 4,
        "num_stages": 2,
        "num_splits": splits,
        "split_tokens": split_tokens,
        "sort": sort,
    }


def test_decode_step_follows_the_tuning_table(case, tmp_path, monkeypatch):
    # A table row for 8 decodes serves a step of 6: its launch shape, split-K and order reach the kernel, and the
    # output still matches the torch backend. (The table is written for this case's head_dim and element size.)
    from lm_torch.kernels import decode_attention as module

    table = {"4": _plan(16, 1, 64, False), "8": _plan(32, 3, 16, True)}
    path = _write_table(
        tmp_path / "t.json", table, head_dim=32, kv_bytes=torch.empty(0, dtype=case.dtype).element_size()
    )
    from lm_torch.config import KernelConfig
    from lm_torch.kernels import tuning

    # The backend looks plans up in the tables it is given; without any, in the shipped ones: replaced here.
    monkeypatch.setattr(
        tuning, "shipped_tables", lambda name: tuning.TuningTables.load(KernelConfig(decode_tuning=path))
    )
    calls = []
    real = module.decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "decode_attention", spy)
    context_lens = [1, 16, 17, 64, 100, 47]
    (out, _), (expected, _) = _step(case, 3, [1] * 6, context_lens, 8, 2, 32, None, None)
    case.assert_close(out, expected, 2 * case.attention_tol)
    (kwargs,) = calls
    assert (kwargs["block_n"], kwargs["num_warps"], kwargs["num_stages"]) == (32, 4, 2)
    assert (kwargs["num_splits"], kwargs["split_tokens"]) == (3, 16)
    assert kwargs["seq_order"].tolist() == sorted(range(6), key=lambda i: -context_lens[i])


def _tables(device_name=None, **fields):
    from lm_torch.config import KernelConfig
    from lm_torch.kernels.tuning import TuningTables

    return TuningTables.load(KernelConfig(**fields), device_name)


def test_tuning_table_lookup_and_validation(tmp_path):
    from lm_torch.kernels import decode_attention as module

    cache = torch.empty(1, 16, 8, 128, dtype=torch.bfloat16)  # on the CPU: the device name is given below
    table = {"16": _plan(64, 5, 64, False), "1": _plan(64, 16, 64, False), "256": _plan(128, 1, 64, True)}
    path = _write_table(tmp_path / "h100.json", table, "NVIDIA H100 80GB HBM3")
    assert _tables(None, decode_tuning=path).decode_plan(3, cache) is None  # the table names a card; not this one
    tables = _tables("NVIDIA H100 80GB HBM3", decode_tuning=path)
    assert tables.decode_plan(1, cache)["num_splits"] == 16
    assert tables.decode_plan(2, cache)["num_splits"] == 5  # the fewest decodes measured at or above
    assert tables.decode_plan(200, cache)["block_n"] == 128
    assert tables.decode_plan(257, cache) is None  # beyond the table: the kernel's defaults
    assert tables.decode_plan(1, cache.half())["num_splits"] == 16  # fp16: the same tiles as bf16
    assert tables.decode_plan(1, cache.float()) is None  # float32 tiles are twice the size
    assert tables.decode_plan(1, torch.empty(1, 16, 8, 64, dtype=torch.bfloat16)) is None  # another head_dim
    assert tables.decode_plan(1, cache.to(torch.uint8)) is None  # quantized codes
    assert module.tuned_decode_plan(1, cache, tables)["num_splits"] == 16  # the kernel module's lookup: the same
    assert _tables("NVIDIA A100-SXM4-80GB", decode_tuning=path).decode_plan(1, cache) is None
    assert _tables("NVIDIA H100 80GB HBM3", decode_tuning="none").decode_plan(1, cache) is None
    missing = _tables("NVIDIA H100 80GB HBM3", decode_tuning=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"KernelConfig.decode_tuning=.*missing\.json.* is not a file"):
        missing.decode_plan(1, cache)  # a mistyped path is an error
    from lm_torch.kernels import tuning

    no_table = tuning.TuningTables(
        "NVIDIA H100 80GB HBM3", str(tmp_path / "missing.json"), False, {}, {}
    )  # no committed table (a card without one): the defaults
    assert no_table.decode_plan(1, cache) is None
    bad = {"x": _plan(64, 1, 64, False)}, {"4": {"block_n": 64}}, {"4": _plan(64, 99, 64, False)}
    for i, configs in enumerate(bad):
        tables = _tables(None, decode_tuning=_write_table(tmp_path / f"bad{i}.json", configs))
        with pytest.raises(ValueError, match=r"decode tuning|plan of"):
            tables.decode_plan(1, cache.half())
    (tmp_path / "nohead.json").write_text('{"configs": {}}')
    with pytest.raises(ValueError, match="head_dim and kv_bytes"):
        _tables(None, decode_tuning=str(tmp_path / "nohead.json")).decode_plan(1, cache)


def test_graph_split_plan_takes_the_table(tmp_path):
    from lm_torch.envs import DecodeSplits
    from lm_torch.kernels.decode_attention import graph_split_plan

    cpu, cache = torch.device("cpu"), torch.empty(1, 16, 8, 128, dtype=torch.bfloat16)
    heuristic = {bucket: graph_split_plan(bucket, 8, 4096, cpu) for bucket in (16, 32)}  # no cache: no table
    tables = _tables(None, decode_tuning=_write_table(tmp_path / "t.json", {"16": _plan(64, 6, 128, False)}))
    assert graph_split_plan(16, 8, 4096, cpu, tuning=tables, k_cache=cache) == (6, 128)
    assert graph_split_plan(16, 8, 4096, cpu, tuning=tables) == heuristic[16]
    assert graph_split_plan(16, 8, 4096, cpu, tuning=tables, k_cache=cache.to(torch.uint8)) == heuristic[16]
    override = DecodeSplits.parse("2:256")  # KernelConfig.decode_splits (LM_TORCH_DECODE_SPLITS)
    assert graph_split_plan(16, 8, 4096, cpu, override, tables, cache) == (max(2, heuristic[16][0]), 256)
    assert graph_split_plan(32, 8, 4096, cpu, tuning=tables, k_cache=cache) == heuristic[32]  # no row at or above 32
