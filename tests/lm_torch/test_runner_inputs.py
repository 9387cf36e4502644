"""The runner's inputs, which every device builds with the same code and which run anywhere: step layouts (checked
against `StepMetadata.build`), pending tokens read from the token buffer, CUDA-graph buckets and their padding, the
staging buffers, and the KV-cache memory plan."""

from __future__ import annotations

import pytest
import torch

from lm_core.generation_config import GenerationConfig
from lm_torch.attention import StepMetadata
from lm_torch.config import TorchEngineConfig
from lm_torch.envs import DecodeSplits
from lm_torch.kernels.decode_attention import graph_split_plan
from lm_torch.memory import GIB, SAFETY_MARGIN, plan_kv_cache
from lm_torch.runner.cuda_graph import graph_buckets
from lm_torch.runner.inputs import (
    EagerInputs,
    GraphInputs,
    build_host_step,
    eager_token_bucket,
    pad_host_step,
    prefill_tile_arrays,
    resolve_input_ids,
    zero_padding_rows,
)
from lm_torch.scheduler import ScheduledBatch
from lm_torch.sequence import Sequence

BLOCK_SIZE = 4


def _seq(name: str, num_tokens: int, computed: int, blocks: list[int]) -> Sequence:
    ids = list(range(100, 100 + num_tokens))
    seq = Sequence(name, ids, min(num_tokens, 3), GenerationConfig())
    seq.num_computed_tokens, seq.block_table = computed, blocks
    return seq


def _mixed_batch() -> ScheduledBatch:
    # A decode, a chunk after a cached prefix, a fresh prompt, a one-token chunk mid-prompt; shuffled block ids.
    seqs = [
        _seq("decode", 10, 9, [7, 2, 11]),
        _seq("chunk", 14, 6, [3, 9, 0, 5]),
        _seq("fresh", 5, 0, [1, 8]),
        _seq("single", 9, 4, [4, 6]),
    ]
    return ScheduledBatch(seqs, [1, 6, 5, 1], [1, 0, 1, 0])


def _host(batch: ScheduledBatch, slots: list[int] | None = None):
    return build_host_step(batch, BLOCK_SIZE, slots if slots is not None else [-1] * len(batch.seqs))


def test_host_step_matches_step_metadata():
    batch = _mixed_batch()
    host = _host(batch)
    context_lens = [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
    meta = StepMetadata.build(
        batch.num_new_tokens, context_lens, [s.block_table for s in batch.seqs], BLOCK_SIZE, "cpu"
    )
    assert host.slot_mapping.tolist() == meta.slot_mapping.tolist()
    assert host.query_start_loc.tolist() == meta.query_start_loc.tolist()
    assert host.context_lens.tolist() == meta.context_lens_tensor.tolist() == context_lens
    assert host.block_tables.shape == (4, 16)  # widths are padded to 16: one triton specialisation
    assert host.block_tables[:, : meta.block_tables.shape[1]].tolist() == meta.block_tables.tolist()
    expected_ids = [
        t
        for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
        for t in s.token_ids[s.num_computed_tokens :][:n]
    ]
    assert host.input_ids.tolist() == expected_ids
    assert host.positions.tolist() == [9, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 4]
    assert (host.sources == -1).all()


def test_pending_tokens_are_read_from_the_request_slot():
    """A row whose last input token is pending (sampled by a step whose result is not back) reads it from its
    request's token-buffer slot; the host array holds 0 there, never a made-up token id."""
    a, b = _seq("a", 5, 5, [0, 1]), _seq("b", 2, 2, [2])
    batch = ScheduledBatch(
        [a, b, _seq("c", 4, 3, [3])],
        [1, 2, 1],
        [1, 1, 1],
        starts=[5, 1, 3],
        token_ids=[[], [101], [103]],  # a: its pending token only; b: a known token, then its pending one
    )
    host = _host(batch, [4, 0, 2])
    assert host.input_ids.tolist() == [0, 101, 0, 103] and host.sources.tolist() == [4, -1, 0, -1]
    assert host.positions.tolist() == [5, 1, 2, 3]
    token_buffer = torch.tensor([50, 51, 52, 53, 54])
    ids = resolve_input_ids(torch.tensor(host.input_ids, dtype=torch.int32), torch.tensor(host.sources), token_buffer)
    assert ids.tolist() == [54, 101, 50, 103]
    with pytest.raises(RuntimeError, match="pending"):
        _host(batch, [-1, 0, 2])  # a pending token with no slot


def test_graph_buckets():
    buckets = graph_buckets(256)
    assert buckets[:5] == [1, 2, 4, 8, 16] and buckets[-1] == 256 and buckets == sorted(set(buckets))
    assert len(buckets) == 23
    for n in range(1, 257):  # at most 7 padding rows up to 64, 15 beyond
        bucket = next(b for b in buckets if b >= n)
        assert bucket - n <= (7 if n <= 64 else 15)
    assert graph_buckets(1) == [1] and graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="max_batch_size"):
        graph_buckets(0)
    # Chosen sizes (TorchEngineConfig.cuda_graph_sizes): sorted, deduplicated, none above the batch limit.
    assert graph_buckets(256, [64, 8, 256, 8]) == [8, 64, 256]
    assert graph_buckets(32, [1, 16, 48]) == [1, 16]


@pytest.mark.parametrize("sizes", [[], [0, 8], [8, 300], [True], "8", [8.0]])
def test_cuda_graph_sizes_are_checked(sizes):
    from lm_torch.config import TorchEngineConfig

    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        TorchEngineConfig(max_batch_size=256, cuda_graph_sizes=sizes)
    assert TorchEngineConfig(max_batch_size=256, cuda_graph_sizes=[1, 256]).cuda.cuda_graph_sizes == (1, 256)


def test_graph_split_plan():
    """A bucket's decode split-K is the kernel's heuristic for a 1k context (the CPU counts 8 multiprocessors: 4
    waves, 32 programs), splits of at least 64 tokens; an (S, T) override raises the buckets below S to S splits of
    at least T tokens."""
    cpu = torch.device("cpu")
    assert graph_split_plan(1, 8, 4096, cpu) == (4, 64)  # 32 programs wanted, 8 kv heads
    assert graph_split_plan(1, 1, 4096, cpu) == (16, 64)
    assert graph_split_plan(1, 1, 100, cpu) == (1, 64)  # no split when the engine's contexts are short
    assert graph_split_plan(64, 8, 4096, cpu) == (1, 64)
    assert graph_split_plan(64, 8, 4096, cpu, DecodeSplits(4, 256)) == (4, 256)
    assert graph_split_plan(1, 1, 4096, cpu, DecodeSplits(4, 256)) == (16, 256)  # more splits already: kept
    assert graph_split_plan(1, 1, 4096, cpu, DecodeSplits(64, 64)) == (32, 64)  # at most MAX_SPLITS


def test_graph_inputs_pad_rows_to_the_bucket():
    inputs = GraphInputs(max_batch=16, max_width=20, device=torch.device("cpu"))
    assert inputs.max_width == 32
    seqs = [_seq(f"s{i}", 5 + 4 * i, 4 + 4 * i, list(range(3 * i, 3 * i + 2 + i))) for i in range(3)]
    host = _host(ScheduledBatch(seqs, [1, 1, 1], [1] * 3))
    inputs.upload(host, 8, [5, 3, 7])
    assert inputs.sample_slots(3).tolist() == [5, 3, 7]
    step = inputs.views(8)
    assert step.input_ids[:3].tolist() == host.input_ids.tolist() and step.input_ids[3:].tolist() == [0] * 5
    assert step.slot_mapping[:3].tolist() == host.slot_mapping.tolist() and step.slot_mapping[3:].eq(-1).all()
    assert step.context_lens.tolist() == host.context_lens.tolist() + [0] * 5  # padding attends nothing
    assert step.query_start_loc.tolist() == list(range(9))  # one token per row, padding included
    assert step.sources.eq(-1).all()
    assert step.block_tables.shape == (8, 32)
    for i, seq in enumerate(seqs):
        assert step.block_tables[i, : len(seq.block_table)].tolist() == seq.block_table
    # A smaller step later overwrites the rows it uses and re-pads the rest.
    inputs.upload(_host(ScheduledBatch(seqs[:1], [1], [1])), 2, [0])
    assert inputs.views(2).slot_mapping.tolist() == [host.slot_mapping[0], -1]
    with pytest.raises(ValueError, match="bucket"):
        inputs.upload(host, 2, [0, 1, 2])


def test_zero_padding_rows_zeroes_only_the_padding_embeddings():
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(10, 4)
    ids = torch.tensor([3, 0, 5, 0])
    padding = torch.tensor([False, False, False, True])  # token 0 in row 1 is a real token
    with zero_padding_rows(model, padding):
        inside = model.embed_tokens(ids)
    expected = model.embed_tokens(ids)  # the hook is gone after the block
    assert expected[3].ne(0).any()
    torch.testing.assert_close(inside[:3], expected[:3], rtol=0, atol=0)
    assert inside[3].eq(0).all()
    with zero_padding_rows(model, 2):  # an eager step: rows from 2 on are padding
        inside = model.embed_tokens(ids)
    torch.testing.assert_close(inside[:2], expected[:2], rtol=0, atol=0)
    assert inside[2:].eq(0).all()


def test_eager_inputs_hold_every_tensor_of_a_mixed_step():
    from lm_torch.kernels.prefill_attention import prefill_tiles

    batch = _mixed_batch()
    host = _host(batch)
    inputs = EagerInputs(max_tokens=32, max_seqs=8, max_width=40, device=torch.device("cpu"))
    ends = host.query_start_loc[1:] - 1
    step = inputs.upload(host, ends[[0, 2]].tolist(), [6, 1], tokens_per_tile=2)
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "context_lens"):
        assert getattr(step, name).tolist() == getattr(host, name).tolist(), name
    assert step.block_tables.tolist() == host.block_tables.tolist()
    assert step.sample_index.tolist() == [0, 11] and step.sample_slots.tolist() == [6, 1]
    tile_seq, tile_first = prefill_tiles(host.query_lens, 2, "cpu")
    assert step.tile_seq.tolist() == tile_seq.tolist() and step.tile_first.tolist() == tile_first.tolist()
    assert [a.tolist() for a in prefill_tile_arrays([1, 5, 1], 2)] == [[1, 1, 1], [0, 2, 4]]
    with pytest.raises(ValueError, match="staging"):
        long = ScheduledBatch([_seq("long", 40, 0, list(range(10)))], [40], [1])
        inputs.upload(build_host_step(long, 4, [0]), [39], [0], 2)


def test_eager_steps_are_padded_to_few_token_counts():
    buckets = [eager_token_bucket(n) for n in range(1, 4097)]
    assert all(b >= n and b - n < max(16, n // 4) for n, b in enumerate(buckets, start=1))
    assert len(set(buckets)) <= 44 and buckets == sorted(buckets)
    host = _host(_mixed_batch())
    padded = pad_host_step(host, eager_token_bucket(host.num_tokens))
    n, total = host.num_tokens, padded.num_tokens
    assert total == 16 and n < total
    # The real tokens are unchanged; the padding belongs to no sequence, writes no KV and reads no earlier token.
    for name in ("input_ids", "sources", "positions", "slot_mapping"):
        assert getattr(padded, name)[:n].tolist() == getattr(host, name).tolist(), name
    assert padded.input_ids[n:].tolist() == [0] * (total - n) and padded.positions[n:].tolist() == [0] * (total - n)
    assert padded.slot_mapping[n:].tolist() == [-1] * (total - n) and padded.sources[n:].tolist() == [-1] * (total - n)
    assert padded.query_start_loc.tolist() == host.query_start_loc.tolist() and padded.query_start_loc[-1] == n
    inputs = EagerInputs(max_tokens=30, max_seqs=8, max_width=40, device=torch.device("cpu"))
    step = inputs.upload(padded, [0], [0], tokens_per_tile=2)  # room for the padding of a 30-token budget
    assert step.input_ids.shape[0] == total and step.query_start_loc[-1].item() == n
    with pytest.raises(ValueError, match="pad"):
        pad_host_step(host, n - 1)


def _plan(free_gib: float, reserve_gib: float, **config):
    cfg = TorchEngineConfig(**{"block_size": 16, "max_batch_size": 64, **config})
    per_block = 2 * 1024**2  # 2 MiB a block
    return plan_kv_cache(
        cfg, per_block, 15 * GIB, 8192, free=int(free_gib * GIB), activation_reserve=int(reserve_gib * GIB), on_gpu=True
    )


def test_gpu_memory_plan():
    plan = _plan(60, 2)  # cache_max_entry_count 0.8 of 60 GiB
    assert plan.num_blocks == int(0.8 * 60 * 1024 / 2) and plan.activation_reserve == 2 * GIB
    summary = plan.summary()
    for text in ("weights 15.00 GiB", "60.00 GiB free", "activation reserve 2.00 GiB", f"{plan.num_blocks} blocks"):
        assert text in summary
    # A high ratio is capped so that the reserve stays free.
    capped = _plan(60, 20, cache_max_entry_count=0.9)
    assert capped.kv_bytes <= 60 * GIB - 20 * GIB - SAFETY_MARGIN and "capped" in capped.source
    assert _plan(60, 2, kv_cache_gb=10).num_blocks == 10 * 512
    with pytest.raises(ValueError, match="kv_cache_gb"):
        _plan(60, 2, kv_cache_gb=59)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        _plan(4, 2, num_kv_blocks=4096)
    with pytest.raises(ValueError, match="fewer than two blocks"):
        _plan(0.6, 0, kv_cache_gb=0.001)
    # Never more than max_batch_size sessions can use.
    assert _plan(60, 2, max_batch_size=1).num_blocks == 8192 // 16 + 1


def test_config_validates_new_fields():
    with pytest.raises(ValueError, match="overlap_steps"):
        TorchEngineConfig(overlap_steps="yes")
    with pytest.raises(ValueError, match="eager_mode"):
        TorchEngineConfig(eager_mode=1)
    with pytest.raises(ValueError, match="prefill_interval"):
        TorchEngineConfig(prefill_interval=-1)


@pytest.mark.parametrize("vocab", [128256, 49152, 300, 1001])
def test_chunked_argmax_is_torch_argmax(vocab):
    from lm_torch.sampling.ops import argmax_rows

    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1] = 0.0  # all tied: the first index
    logits[2, 7] = logits[2, vocab - 1] = 100.0  # tied across chunks: the earlier one
    logits[3] = logits[3].round()  # many ties
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
