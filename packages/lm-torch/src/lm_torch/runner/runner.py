"""`ModelRunner`: owns the model, the paged KV cache, the attention backend and the sampler; runs scheduled steps.

A step is `launch(batch)` then `collect(handle)`. `launch` brings the per-request states up to the batch
(`RequestStates.apply`), lays the batch out on the host (`inputs.build_host_step`, the same code for every device),
runs the forward pass and queues the sampling. On CUDA with Triton (`is_async`) it only queues work: the inputs go up
in one non-blocking copy, decode batches replay a CUDA graph, the rest run eagerly through the Triton kernels, greedy
rows take their arg-max on the device, and the sampled ids come back through a non-blocking copy into pinned memory;
`collect` waits for that copy. On the CPU `launch` computes everything (a second thread issuing torch ops would halve
the speed there). Sampled tokens also go to the device token buffer, one slot per running request, where the next
step reads a token still pending on the host.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from lm_torch.attention import StepMetadata
from lm_torch.config import TorchEngineConfig
from lm_torch.cpu_threads import ThreadTuner
from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.guided import fill_bitmasks
from lm_torch.kernels import triton_available
from lm_torch.kv_quant import KVCache, allocate_kv_cache, bytes_per_token
from lm_torch.loader import build_model, load_hf_config, resolve_device, resolve_dtype
from lm_torch.memory import MemoryPlan
from lm_torch.models.base import CausalLM
from lm_torch.runner.inputs import (
    DeviceStep,
    EagerInputs,
    GraphInputs,
    HostStep,
    PinnedStaging,
    build_host_step,
    eager_token_bucket,
    pad_host_step,
    resolve_input_ids,
    zero_padding_rows,
)
from lm_torch.runner.state import RequestState, RequestStates
from lm_torch.sampling import PendingLogprobs, Sampler, SamplingInputs
from lm_torch.sampling.ops import argmax_rows
from lm_torch.sampling.prompt_logprobs import PendingPromptLogprobs, compute_prompt_logprobs
from lm_torch.scheduler import ScheduledBatch, StepResult

if TYPE_CHECKING:
    from lm_torch.runner.cuda_graph import CudaGraphRunner


@dataclass
class StepHandle:
    """A launched step. `collect` turns it into a `StepResult` (on the CPU `result` is ready at launch)."""

    batch: ScheduledBatch
    states: list[RequestState]  # per row
    sample_rows: list[int] = field(default_factory=list)  # batch rows that sample, in sampled-token order
    host_tokens: torch.Tensor | None = None  # [>= len(sample_rows)] int64 on the host, valid once `event` completed
    event: torch.cuda.Event | None = None
    logprobs: PendingLogprobs | None = None  # per sampled row, read once the step is done
    embeddings: list[list[float] | None] | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None
    result: StepResult | None = None


class ModelRunner:
    """Builds a step's tensors from a `ScheduledBatch`, runs the model and samples."""

    def __init__(
        self, model_path: Path, config: TorchEngineConfig, tp: TPGroup = SINGLE, device: torch.device | None = None
    ) -> None:
        """`tp`: this runner's tensor-parallel group (every rank runs a runner over its shard of the model, on
        `device`; rank 0 samples, the others receive its tokens)."""
        from lm_torch.runner import startup

        start = time.perf_counter()
        if config.runtime.num_threads:
            torch.set_num_threads(config.runtime.num_threads)
        self.config = config
        self.model_path = model_path
        self.tp = tp
        self.hf_config = load_hf_config(model_path)
        self.device = device if device is not None else resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.hf_config, self.device)
        # CPU steps with no fixed num_threads run on the thread count the tuner finds fastest (see cpu_threads); the
        # ranks of a tensor-parallel group keep the count they were given, so that no rank waits on a slower one.
        self.thread_tuner = (
            ThreadTuner(torch.get_num_threads())
            if self.device.type == "cpu" and not config.runtime.num_threads and tp.size == 1
            else None
        )
        self.phases: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # the CUDA context, timed on its own
            self.phases["CUDA init"] = time.perf_counter() - start
            start = time.perf_counter()
        self.session_len = config.scheduler.session_len or self.hf_config.max_position_embeddings
        self.vocab_size = self.hf_config.vocab_size
        self.block_size = config.cache.block_size
        # CUDA with Triton: `launch` only queues device work, and `collect` waits for it.
        self.is_async = self.device.type == "cuda" and triton_available()
        self.zero_padding = config.kernels.zero_padding
        # The kernels' tuning tables, loaded once and handed to the layers and the attention backend.
        self.tuning = startup.load_tuning(self)
        self.backend = startup.make_attention_backend(self)
        # Parameters are created in the compute dtype straight away: an 8B model would otherwise be materialised
        # (and randomly initialised) in float32 first, twice the bytes, only to be cast.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            # Every model class the loader builds has CausalLM's interface.
            self.model = cast(
                CausalLM,
                build_model(model_path, config, self.hf_config, self.device, self.dtype, self.backend, self.tuning, tp),
            )
        finally:
            torch.set_default_dtype(default_dtype)
        self.phases["load"] = time.perf_counter() - start
        # A vision-language model: the step's image features and M-RoPE positions (runner.multimodal).
        self.takes_media = hasattr(self.model, "encode")
        self.media = None
        if self.takes_media:
            from lm_torch.runner.multimodal import StepMedia

            self.media = StepMedia(self.model, self.device, config.cache.encoder_cache_tokens)
        self.sampler = Sampler()
        self.requests = RequestStates(config.scheduler.max_batch_size)
        # Each running request's last sampled token, at its slot: the next step reads a pending token from here.
        self.token_buffer = torch.zeros(config.scheduler.max_batch_size, dtype=torch.int64, device=self.device)
        # Step counts by path, for benchmarks: decode batches replayed from a graph, steps run eagerly.
        self.counters = {
            "graph_steps": 0,
            "graph_rows": 0,
            "graph_padding_rows": 0,
            "eager_steps": 0,
            "eager_tokens": 0,
        }
        # Set by start-up: the memory plan, and on the Triton path the staging buffers and the CUDA graphs.
        self.plan: MemoryPlan | None = None
        self.graphs: CudaGraphRunner | None = None
        self.eager_inputs: EagerInputs | None = None
        self.graph_inputs: GraphInputs | None = None
        self.token_staging: PinnedStaging | None = None
        self.tokens_per_tile: int | None = None  # the Triton prefill kernel's tile (CUDA eager steps)
        self.kv_caches: list[KVCache] = []
        startup.plan_and_allocate(self)

    @property
    def num_blocks(self) -> int:
        """KV-cache blocks of the memory plan."""
        if self.plan is None:
            raise RuntimeError("the runner has no memory plan yet")
        return self.plan.num_blocks

    def allocate_kv(self, num_blocks: int) -> list[KVCache]:
        """Zeroed KV caches of `num_blocks` blocks for every layer (the torch backend reads whole blocks, masking what
        it does not need, and 0 * NaN would be NaN)."""
        policy = self.config.cache.quant_policy
        return [
            allocate_kv_cache(num_blocks, self.block_size, heads, dim, policy, self.dtype, self.device)
            for heads, dim in self.model.kv_cache_shape()
        ]

    def kv_bytes_per_block(self) -> int:
        """Bytes one KV-cache block takes over every layer (keys, values, and a quantized cache's scales)."""
        policy = self.config.cache.quant_policy
        return sum(
            self.block_size * bytes_per_token(heads, dim, policy, self.dtype)
            for heads, dim in self.model.kv_cache_shape()
        )

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """The start-up summary lines (`startup.summary`)."""
        from lm_torch.runner.startup import summary

        return summary(self, wall_s, import_s)

    # -- one step ----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Queue `batch`'s forward pass and sampling (CUDA with Triton), or compute them (elsewhere)."""
        states = self.requests.apply(batch)
        handle = StepHandle(batch, states, batch.sample_rows)
        if self.is_async:
            self._launch(handle)
            return handle
        tuner = self.thread_tuner
        if tuner is None:
            self._launch(handle)
        else:
            threads = tuner.next_threads()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            started = time.perf_counter()
            self._launch(handle)
            tuner.record(threads, batch.num_tokens, time.perf_counter() - started)
        handle.result = self._result(handle)
        return handle

    def collect(self, handle: StepHandle) -> StepResult:
        """Wait for a launched step and return its tokens."""
        if handle.result is None:
            handle.result = self._result(handle)
        return handle.result

    def _launch(self, handle: StepHandle) -> None:
        batch, rows, states = handle.batch, handle.sample_rows, handle.states
        slots = [state.slot for state in states]
        host = build_host_step(batch, self.block_size, slots)
        mm, mrope = self.media.prepare(batch, states, host) if self.media is not None else (None, None)
        sample_slots = [slots[i] for i in rows]
        embedding = any(state.pooling is not None for state in states)
        graphs, graph_inputs, bucket = self.graphs, self.graph_inputs, None
        text_only = mm is None and mrope is None
        if graphs is not None and not embedding and text_only and host.num_tokens == host.num_seqs:
            bucket = graphs.bucket_for(host.num_seqs)
        if bucket is not None and graphs is not None and graph_inputs is not None:
            graph_inputs.upload(host, bucket, sample_slots)
            hidden = graphs.replay(bucket)[: host.num_seqs]  # [num_seqs, hidden]
            self._count(graph_steps=1, graph_rows=host.num_seqs, graph_padding_rows=bucket - host.num_seqs)
            # One token per sequence: these rows are every token of the step too.
            handle.prompt_logprobs = compute_prompt_logprobs(self.model, hidden, batch, states, self.vocab_size)
            if len(rows) < host.num_seqs:
                hidden = hidden.index_select(0, torch.tensor(rows).to(self.device, non_blocking=True))
            slot_index = graph_inputs.sample_slots(len(rows))
        else:
            step, num_real = self._device_step(host, rows, sample_slots)
            hidden, full = self._forward(host, step, num_real, mm, mrope)
            self._count(eager_steps=1, eager_tokens=batch.num_tokens)
            if embedding:
                handle.embeddings = self._pool(batch, states, full)
            handle.prompt_logprobs = compute_prompt_logprobs(self.model, full, batch, states, self.vocab_size)
            slot_index = step.sample_slots
        if rows:
            if slot_index is None:
                raise RuntimeError("a sampling step has no token-buffer slots")
            self._sample(handle, hidden, slot_index)

    def _device_step(self, host: HostStep, rows: list[int], sample_slots: list[int]) -> tuple[DeviceStep, int]:
        """The step's input tensors where the model runs, and its number of real tokens. On CUDA with Triton the
        step is padded to a few token counts (see `eager_token_bucket`) and goes up in one copy; elsewhere the
        tensors are views of the host arrays."""
        ends = host.query_start_loc[1:] - 1
        sample_index = ends[rows]
        num_real = host.num_tokens
        if self.is_async:
            if self.eager_inputs is None or self.tokens_per_tile is None:
                raise RuntimeError("the CUDA staging buffers are not set up")
            padded = pad_host_step(host, eager_token_bucket(num_real))
            return self.eager_inputs.upload(padded, sample_index.tolist(), sample_slots, self.tokens_per_tile), num_real

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).to(self.device)

        return (
            DeviceStep(
                input_ids=tensor(host.input_ids),
                sources=tensor(host.sources),
                positions=tensor(host.positions),
                slot_mapping=tensor(host.slot_mapping),
                query_start_loc=tensor(host.query_start_loc.astype(np.int32)),
                context_lens=tensor(host.context_lens.astype(np.int32)),
                block_tables=tensor(host.block_tables),
                sample_index=tensor(np.asarray(sample_index, dtype=np.int64)),
                sample_slots=tensor(np.asarray(sample_slots, dtype=np.int64)),
            ),
            num_real,
        )

    def _forward(
        self, host: HostStep, step: DeviceStep, num_real: int, mm: Any = None, mrope: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a step without a graph. Returns the final hidden states of the sampled rows [R, hidden] and of every
        token [T (+ padding), hidden]. `mm`: the step's image features (`MultimodalStep`, with the attention rule
        of its images, if any); `mrope`: its [3, num_real] M-RoPE positions."""
        decodes = [ctx for n, ctx in zip(host.query_lens, host.context_lens_list, strict=True) if n == 1]
        meta = StepMetadata(
            query_lens=host.query_lens,
            context_lens=host.context_lens_list,
            block_size=self.block_size,
            block_tables=step.block_tables,
            slot_mapping=step.slot_mapping,
            query_start_loc=step.query_start_loc,
            context_lens_tensor=step.context_lens,
            num_decodes=len(decodes),
            max_decode_context=max(decodes, default=0),
            num_real_tokens=num_real,
            tile_seq=step.tile_seq,
            tile_first=step.tile_first,
            tokens_per_tile=self.tokens_per_tile,
            key_limits=mm.key_limits if mm is not None else None,
        )
        if (host.sources >= 0).any():  # a pending token: read from the token buffer on the device
            input_ids = resolve_input_ids(step.input_ids, step.sources, self.token_buffer)
        else:
            input_ids = step.input_ids.long()
        state = self.backend.prepare(meta)
        padded = step.input_ids.shape[0] > num_real
        zeroed = self.zero_padding and padded
        positions = step.positions
        if mrope is not None:  # [3, T]: padding rows at position 0, like the one-row positions'
            padded_mrope = np.zeros((3, positions.shape[0]), dtype=np.int64)
            padded_mrope[:, :num_real] = mrope
            positions = torch.from_numpy(padded_mrope).to(self.device)
        extra = {"mm": mm} if mm is not None else {}
        with zero_padding_rows(self.model, num_real) if zeroed else contextlib.nullcontext():
            hidden = self.model(input_ids, positions, self.kv_caches, state, **extra)  # [T (+ padding), hidden]
        return hidden.index_select(0, step.sample_index), hidden

    def _count(self, **increments: int) -> None:
        for name, value in increments.items():
            self.counters[name] += value

    def _sample(self, handle: StepHandle, hidden: torch.Tensor, slot_index: torch.Tensor) -> None:
        """Sample one token per row of `hidden` [rows, hidden], write each into its request's token-buffer slot
        (`slot_index` [rows] on the device) and start its copy to the host. Greedy rows with no other stage take the
        arg-max alone: no host work, no synchronisation."""
        states = [handle.states[i] for i in handle.sample_rows]
        num = len(states)
        if not self.tp.is_driver:  # join the logits' gather, then take rank 0's tokens
            self.model.compute_logits(hidden, for_argmax=True)
            tokens = self.tp.broadcast(torch.empty(num, dtype=torch.int64, device=self.device))
        elif all(state.is_plain_greedy for state in states):
            tokens = argmax_rows(self.model.compute_logits(hidden, for_argmax=True)[:, : self.vocab_size])
        else:
            logits = self.model.compute_logits(hidden)  # [rows, vocab] float32
            out = self._sample_full(states, logits, handle.batch)
            tokens, handle.logprobs = out.token_ids, out.pending_logprobs  # read in `collect`
        if self.tp.is_driver and self.tp.size > 1:
            self.tp.broadcast(tokens)
        self.token_buffer.index_copy_(0, slot_index.long(), tokens)
        staging = self.token_staging
        if staging is None:  # not the Triton path: the step is synchronous
            handle.host_tokens = tokens
            return
        host, _ = staging.acquire()
        host[:num].copy_(tokens, non_blocking=True)
        staging.mark_used(staging.current_index)
        handle.host_tokens, handle.event = host, staging.events[staging.current_index]

    def _sample_full(self, states: list[RequestState], logits: torch.Tensor, batch: ScheduledBatch):
        """The whole `Sampler` (grammars, penalties, biases, bans, truncation, seeded draws, logprobs)."""
        guided = [row for row, state in enumerate(states) if state.grammar is not None]
        bitmask = None
        if batch.guided_bitmask is not None:  # filled by the engine (a runner in another process has no grammars)
            guided = batch.guided_bitmask.rows
            bitmask = torch.from_numpy(batch.guided_bitmask.bitmask).to(self.device, non_blocking=True)
        elif any(isinstance(states[r].grammar, str) for r in guided):  # GUIDED_BY_ENGINE, sent without masks
            raise RuntimeError("a guided request's batch came without its token masks (ScheduledBatch.for_workers)")
        elif guided:
            # Filled on the CPU while the device still runs the forward pass queued above.
            grammars, guided_states = [states[r].grammar for r in guided], [states[r] for r in guided]
            bitmask = fill_bitmasks(grammars, guided_states, self.vocab_size, self.device)
        inputs = SamplingInputs.build(
            [state.gen_config for state in states],
            [state.prompt_token_ids for state in states],
            [state.output_token_ids for state in states],
            [state.bad_word_ids or [] for state in states],
            self.vocab_size,
            self.device,
            [state.generator for state in states],
            guided_rows=guided,
            guided_bitmask=bitmask,
        )
        return self.sampler(logits, inputs)

    def _result(self, handle: StepHandle) -> StepResult:
        batch, rows = handle.batch, handle.sample_rows
        num = len(batch.num_new_tokens)
        token_ids: list[list[int]] = [[] for _ in range(num)]
        logprobs: list[list[dict[int, float]] | None] = [None] * num
        if rows:
            if handle.event is not None:
                handle.event.synchronize()
            host_tokens = handle.host_tokens
            if host_tokens is None:
                raise RuntimeError("a step that samples has no sampled tokens: it was not launched")
            sampled = host_tokens[: len(rows)].tolist()
            row_logprobs = handle.logprobs.resolve() if handle.logprobs is not None else None
            for j, i in enumerate(rows):
                token_ids[i] = [sampled[j]]
                handle.states[i].output_token_ids.append(sampled[j])
                entry = row_logprobs[j] if row_logprobs is not None else None
                if entry is not None:
                    logprobs[i] = [entry]
        pending = handle.prompt_logprobs
        prompt_logprobs = pending.resolve(num) if pending is not None else None
        return StepResult(token_ids, logprobs, handle.embeddings, prompt_logprobs)

    def _pool(
        self, batch: ScheduledBatch, states: list[RequestState], hidden: torch.Tensor
    ) -> list[list[float] | None]:
        """Pool the final hidden states (hidden: [num_tokens, hidden]) of the batch's embedding requests: a vector
        for each whose prompt this step completes, None for the rest (the mean's running sum waits in the request's
        state between chunks)."""
        vectors: list[list[float] | None] = [None] * len(states)
        start = 0
        for i, (state, num_new) in enumerate(zip(states, batch.num_new_tokens, strict=True)):
            end, chunk_start = start + num_new, start
            start = end
            if state.pooling is None:
                continue
            first = batch.starts[i]
            is_last_chunk = first + num_new == state.num_prompt_tokens
            if state.pooling == "mean":
                chunk_sum = hidden[chunk_start:end].sum(dim=0, dtype=torch.float32)  # [hidden]
                # A chunk from position 0 starts the sum afresh: a preempted prompt is recomputed from scratch.
                if first > 0 and state.pooled_sum is not None:
                    chunk_sum += state.pooled_sum
                if not is_last_chunk:
                    state.pooled_sum = chunk_sum
                    continue
                vector = chunk_sum / state.num_prompt_tokens
            elif is_last_chunk:
                vector = hidden[end - 1].float()
            else:
                continue
            state.pooled_sum = None
            if state.normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            vectors[i] = vector.tolist()
        return vectors


def log(message: str) -> None:
    """Print an engine message to stderr at once."""
    print(message, file=sys.stderr, flush=True)
