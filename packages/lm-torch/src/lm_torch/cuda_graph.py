"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of Llama-3-8B is about 450 kernels. Launched one by one from Python they take longer to issue than the
GPU takes to run them at small batches, so the GPU would wait on the host. A graph captured once per bucket replays
the whole forward pass with one launch: a batch of n decodes runs the smallest captured bucket >= n, its rows past n
padding (`step_inputs.GraphInputs` writes them: slot -1, so no KV is written; context 0, so nothing is attended).
The graphs zero the padding rows' embeddings, so those rows stay zero through every layer
(`step_inputs.zero_padding_rows`).

Every graph reads the same static input buffer and returns its final hidden states [bucket, hidden]; the LM head and
the sampler run after the replay, eagerly, since they depend on each request's settings. The decode kernel's split
count is a launch constant a graph fixes at capture, so it is chosen per bucket for a typical context (1k tokens).
All graphs share one memory pool; capturing the largest first lets the smaller ones reuse its blocks.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from lm_torch.attention.metadata import AttentionMetadata
from lm_torch.attention.triton_backend import LAYOUT_KEY, StepLayout
from lm_torch.step_inputs import GraphInputs, resolve_input_ids, zero_padding, zero_padding_rows

# The context length a graph's split-K is chosen for (see `graph_split_plan`).
SPLIT_CONTEXT = 1024
# "S:T": graph buckets whose split-K comes out below S take S splits of at least T tokens each (so only sequences
# longer than T split); for measuring other plans end to end without a code change (benchmarks/h100_session.sh).
SPLITS_ENV = "LM_TORCH_DECODE_SPLITS"


def graph_split_plan(
    bucket: int,
    num_kv_heads: int,
    max_context_len: int,
    device: torch.device,
    override: str | None = None,
    k_cache: torch.Tensor | None = None,
) -> tuple[int, int]:
    """(num_splits, split_tokens) of the decode kernel in a bucket's graph, both fixed at capture. Given the
    engine's `k_cache`, one the decode tuning table was measured for takes the table's plan for the bucket
    (`tuned_decode_plan`). Otherwise what
    the kernel's heuristic picks for a context of `SPLIT_CONTEXT` tokens (or the longest the engine allows, if
    shorter), splits of at least `MIN_TOKENS_PER_SPLIT` tokens: longer contexts run with a few too few splits (16
    instead of 32 at batch 1: about 3 us more per layer at 8k tokens); each sequence uses only the splits its own
    length needs. `override` ("S:T", the `LM_TORCH_DECODE_SPLITS` variable's format) raises the buckets below S
    splits to S and makes every split at least T tokens."""
    from lm_torch.kernels.decode_attention import (
        MAX_SPLITS,
        MIN_TOKENS_PER_SPLIT,
        choose_num_splits,
        tuned_decode_plan,
    )

    plan = None if override or k_cache is None else tuned_decode_plan(bucket, k_cache)
    if plan is not None:
        return plan["num_splits"], plan["split_tokens"]
    splits = choose_num_splits(bucket, num_kv_heads, min(max_context_len, SPLIT_CONTEXT), device)
    if not override:
        return splits, MIN_TOKENS_PER_SPLIT
    try:
        wanted, tokens = (int(part) for part in override.split(":"))
    except ValueError:
        raise ValueError(f"{SPLITS_ENV} must be 'S:T' (two integers), got {override!r}") from None
    if wanted < 1 or tokens < 1:
        raise ValueError(f"{SPLITS_ENV} must be 'S:T' with S and T at least 1, got {override!r}")
    return min(max(splits, wanted), MAX_SPLITS), tokens


def graph_buckets(max_batch_size: int, sizes: list[int] | None = None) -> list[int]:
    """Batch sizes that get a graph: `sizes` (`TorchEngineConfig.cuda_graph_sizes`) at most `max_batch_size`, sorted;
    by default 1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, and max_batch_size.

    A padded row costs little while a step is bound by reading the weights, which is every batch up to about a
    hundred rows here; the steps bound the padding to 7 rows up to 64 and 15 beyond, and the capture stays short
    (23 graphs for 256)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    if sizes is not None:
        return sorted({s for s in sizes if s <= max_batch_size})
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_batch_size + 1, 16)]
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


class CudaGraphRunner:
    """Captures and replays the decode forward pass of `model` for each bucket of `graph_buckets`."""

    def __init__(
        self,
        model,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        inputs: GraphInputs,
        sampled_tokens: torch.Tensor,  # [>= max batch] int64: the previous step's sampled tokens (placeholders)
        block_size: int,
        max_context_len: int,
        max_batch_size: int,
        sizes: list[int] | None = None,  # the batch sizes to capture (`graph_buckets`); None: the default ones
    ) -> None:
        self.model, self.kv_caches, self.inputs = model, kv_caches, inputs
        self.sampled_tokens = sampled_tokens
        self.block_size, self.max_context_len = block_size, max_context_len
        self.buckets = graph_buckets(min(max_batch_size, inputs.max_batch), sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> its graph's hidden states [bucket, hidden]
        self.capture_seconds = 0.0
        self.num_replays = 0

    def split_plan(self, bucket: int) -> tuple[int, int]:
        """(num_splits, split_tokens) of the decode kernel in `bucket`'s graph (`graph_split_plan`)."""
        num_kv_heads = self.kv_caches[0][0].shape[2]
        device = self.sampled_tokens.device
        return graph_split_plan(
            bucket, num_kv_heads, self.max_context_len, device, os.environ.get(SPLITS_ENV), self.kv_caches[0][0]
        )

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured bucket holding `num_seqs` decodes, None when the batch is larger than all."""
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket if bucket in self.graphs else None
        return None

    def forward(self, bucket: int) -> torch.Tensor:
        """The decode forward pass over the static inputs of `bucket` (what a graph captures): [bucket, hidden]."""
        step = self.inputs.views(bucket)
        input_ids = resolve_input_ids(step.input_ids, step.sources, self.sampled_tokens)
        meta = AttentionMetadata(
            query_lens=[1] * bucket,
            context_lens=[self.max_context_len] * bucket,  # host copies are unused: the layout below is given
            block_tables=step.block_tables,
            slot_mapping=step.slot_mapping,
            block_size=self.block_size,
            context_blocks=step.block_tables.new_empty(0),
            context_block_starts=[],
            query_start_loc=step.query_start_loc,
            context_lens_tensor=step.context_lens,
        )
        splits, split_tokens = self.split_plan(bucket)
        meta.cache[LAYOUT_KEY] = StepLayout(
            query_start_loc=step.query_start_loc,
            context_lens=step.context_lens,
            num_decodes=bucket,
            max_decode_context=self.max_context_len,
            num_splits=splits,
            split_tokens=split_tokens,
        )
        # A padding row attends nothing (context 0); a decode at least its own token.
        padding = zero_padding_rows(self.model, step.context_lens == 0) if zero_padding() else contextlib.nullcontext()
        with padding:
            return self.model(input_ids, step.positions, self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket's graph (largest first, one shared pool); returns the seconds it took."""
        from lm_torch.kernels.common import compile_ahead

        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        warmup = torch.cuda.Stream()
        # Every bucket's Triton kernels compiled at once first (batch sizes 1, 2, 16... specialize them differently).
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup), compile_ahead():
            for bucket in self.buckets:
                self.forward(bucket)
        for bucket in sorted(self.buckets, reverse=True):
            # One eager run first, on a side stream as capture wants: triton compiles, cuBLAS picks its kernels, and
            # the decode kernel's split counters are allocated (a capture cannot; largest bucket first: enough for all).
            warmup.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warmup):
                self.forward(bucket)
            torch.cuda.current_stream().wait_stream(warmup)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.forward(bucket)
            self.graphs[bucket] = graph
        # A graph's first launch also uploads it to the device: done here once per bucket, on the padding rows the
        # buffers hold (no KV written, nothing attended), not in the first step of each size (the ShareGPT run's
        # step trace showed 15-21 ms launches at the first decode step of most buckets).
        for bucket in self.buckets:
            self.graphs[bucket].replay()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def replay(self, bucket: int) -> torch.Tensor:
        """Run `bucket`'s graph on what `GraphInputs.upload` wrote; returns its hidden states [bucket, hidden], valid
        until the bucket's next replay (work queued after this call on the same stream reads them safely)."""
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.outputs[bucket]
