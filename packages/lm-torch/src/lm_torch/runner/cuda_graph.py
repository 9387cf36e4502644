"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of Llama-3-8B is about 450 kernels. Launched one by one from Python they take longer to issue than the
GPU takes to run them at small batches, so the GPU would wait on the host. A graph captured once per bucket replays
the whole forward pass with one launch: a batch of n decodes runs the smallest captured bucket >= n, its rows past n
padding (`step_inputs.GraphInputs` writes them: slot -1, so no KV is written; context 0, so nothing is attended).
The graphs zero the padding rows' embeddings, so those rows stay zero through every layer
(`step_inputs.zero_padding_rows`).

Every graph reads the same static input buffer and returns its final hidden states [bucket, hidden]; the LM head and
the sampler run after the replay, eagerly, since they depend on each request's settings. Launch constants of the
attention kernels (the decode kernel's split count) are fixed per bucket by the backend's `prepare_for_capture`.
All graphs share one memory pool; capturing the largest first lets the smaller ones reuse its blocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch

from lm_torch.attention.base import AttentionBackend, StepMetadata
from lm_torch.kv_quant import KVCache
from lm_torch.runner.inputs import GraphInputs, resolve_input_ids, zero_padding_rows


def graph_buckets(max_batch_size: int, sizes: Sequence[int] | None = None) -> list[int]:
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
        backend: AttentionBackend,
        kv_caches: list[KVCache],
        inputs: GraphInputs,
        token_buffer: torch.Tensor,  # [slots] int64: each running request's last sampled token
        block_size: int,
        max_context_len: int,
        max_batch_size: int,
        sizes: Sequence[int] | None = None,  # the batch sizes to capture (`graph_buckets`); None: the default ones
        zero_padding: bool = True,
    ) -> None:
        self.model, self.backend, self.kv_caches, self.inputs = model, backend, kv_caches, inputs
        self.token_buffer = token_buffer
        self.zero_padding = zero_padding
        self.block_size, self.max_context_len = block_size, max_context_len
        self.buckets = graph_buckets(min(max_batch_size, inputs.max_batch), sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> its graph's hidden states [bucket, hidden]
        self.capture_seconds = 0.0
        self.num_replays = 0

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured bucket holding `num_seqs` decodes, None when the batch is larger than all."""
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket if bucket in self.graphs else None
        return None

    def forward(self, bucket: int) -> torch.Tensor:
        """The decode forward pass over the static inputs of `bucket` (what a graph captures): [bucket, hidden]."""
        step = self.inputs.views(bucket)
        input_ids = resolve_input_ids(step.input_ids, step.sources, self.token_buffer)
        meta = StepMetadata(
            query_lens=[1] * bucket,
            context_lens=[self.max_context_len] * bucket,  # host copies are unused by a captured decode
            block_size=self.block_size,
            block_tables=step.block_tables,
            slot_mapping=step.slot_mapping,
            query_start_loc=step.query_start_loc,
            context_lens_tensor=step.context_lens,
            num_decodes=bucket,
            max_decode_context=self.max_context_len,
            num_real_tokens=bucket,
        )
        state = self.backend.prepare_for_capture(meta, bucket)
        # A padding row attends nothing (context 0); a decode at least its own token.
        padding = (
            zero_padding_rows(self.model, step.context_lens == 0) if self.zero_padding else contextlib.nullcontext()
        )
        with padding:
            return self.model(input_ids, step.positions, self.kv_caches, state)

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
        # buffers hold (no KV written, nothing attended), not in the first step of each size, which would stall.
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
