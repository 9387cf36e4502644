"""`ModelRunner`: owns the model, the paged KV cache and the sampler; runs one scheduled batch per call.

A step is `launch(batch)` then `collect(handle)`. On CUDA `launch` only queues work: the inputs go up in one
non-blocking copy (`step_inputs`), decode batches replay a CUDA graph (`cuda_graph`), the rest run eagerly through
the Triton kernels, greedy rows take their arg-max on the device, and the sampled ids come back through a
non-blocking copy into pinned memory. `collect` waits for that copy. Between the two the engine schedules the next
step, whose placeholder ids (tokens not back yet) the device fills from this step's sampled tokens. On the CPU
`launch` computes everything at once (a second thread of torch ops would halve the speed there).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm_torch.attention import AttentionMetadata, TorchAttentionBackend
from lm_torch.config import TorchEngineConfig
from lm_torch.cpu_threads import ThreadTuner
from lm_torch.guided import fill_bitmasks
from lm_torch.kernels import triton_available
from lm_torch.kv_quant import KVCache, allocate_kv_cache, bytes_per_token, kv_dtype_name
from lm_torch.loader import build_model, load_hf_config, resolve_device, resolve_dtype
from lm_torch.memory import free_memory, plan_kv_cache
from lm_torch.sampling import PendingLogprobs, Sampler, SamplingInputs, is_plain_greedy
from lm_torch.sampling.ops import argmax_rows
from lm_torch.sampling.prompt_logprobs import PendingPromptLogprobs, PromptLogprobsChunk, compute_prompt_logprobs
from lm_torch.scheduler import ScheduledBatch


@dataclass
class StepOutput:
    """Per sequence of the batch: the sampled token (None where the step ended mid-prompt) and its logprobs; for an
    embedding sequence whose prompt this step completed, its pooled vector (None everywhere else); for a sequence
    that wants prompt logprobs, those of the prompt tokens this step predicted (None: no sequence has any)."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None]
    embeddings: list[list[float] | None] | None = None
    prompt_logprobs: list[PromptLogprobsChunk | None] | None = None


@dataclass
class StepHandle:
    """A launched step. `collect` turns it into a `StepOutput` (on the CPU `output` is ready at launch)."""

    batch: ScheduledBatch
    sample_rows: list[int] = field(default_factory=list)  # batch rows that sample, in sampled-token order
    host_tokens: torch.Tensor | None = None  # pinned [>= len(sample_rows)] int64, valid once `event` has completed
    event: torch.cuda.Event | None = None
    logprobs: PendingLogprobs | None = None  # per sampled row, read once the step is done
    embeddings: list[list[float] | None] | None = None
    guided_rows: list[int] = field(default_factory=list)  # positions in sample_rows of guided sequences
    prompt_logprobs: PendingPromptLogprobs | None = None
    output: StepOutput | None = None


class ModelRunner:
    """Builds a step's tensors from a `ScheduledBatch`, runs the model and samples."""

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        start = time.perf_counter()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_path = model_path
        self.hf_config = load_hf_config(model_path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        # CPU steps with no fixed num_threads run on the thread count the tuner finds fastest (see cpu_threads).
        self.thread_tuner = (
            ThreadTuner(torch.get_num_threads()) if self.device.type == "cpu" and not config.num_threads else None
        )
        self.phases: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # the CUDA context, timed on its own
            self.phases["CUDA init"] = time.perf_counter() - start
            start = time.perf_counter()
        # Parameters are created in the compute dtype straight away: an 8B model would otherwise be materialised
        # (and randomly initialised) in float32 first, twice the bytes, only to be cast.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        # The attention backend and the kernels' tuning tables are part of the model's construction.
        self.fast = self.device.type == "cuda" and triton_available()
        tuning = None
        if self.fast:
            from lm_torch.attention import TritonAttentionBackend
            from lm_torch.kernels.common import cuda_device_name
            from lm_torch.kernels.tuning import TuningTables

            backend = TritonAttentionBackend()
            tuning = TuningTables.load(config.kernels, cuda_device_name(self.device))
        else:
            backend = TorchAttentionBackend()
        try:
            self.model = build_model(model_path, config, self.hf_config, self.device, self.dtype, backend, tuning)
        finally:
            torch.set_default_dtype(default_dtype)
        self.session_len = config.session_len or self.hf_config.max_position_embeddings
        self.vocab_size = self.hf_config.vocab_size
        self.block_size = config.block_size
        # One generator per seeded request, advanced only by that request's draws: seeded output is independent of
        # whatever else shares the batch.
        self.generators: dict[str, torch.Generator] = {}
        self.bad_words_ids: dict[str, list[list[int]]] = {}
        # Mean pooling over a chunked prompt: the running float32 sum of the final hidden states computed so far.
        self.pooled_sums: dict[str, torch.Tensor] = {}
        self._plain_greedy: dict[str, bool] = {}  # per request: greedy with no other sampling stage (cached)
        self.sampler = Sampler()
        # Where each request's sampled token sits among the last launched step's: placeholders of the next step
        # are filled from there (`sampled_tokens` on CUDA, `_last_sampled` on the CPU).
        self._previous_rows: dict[str, int] = {}
        self._last_sampled: dict[str, int] = {}
        self.phases["load"] = time.perf_counter() - start
        # Step counts by path, for benchmarks: decode batches replayed from a graph, steps run eagerly.
        self.counters = {
            "graph_steps": 0,
            "graph_rows": 0,
            "graph_padding_rows": 0,
            "eager_steps": 0,
            "eager_tokens": 0,
        }
        self.graphs = None
        if self.fast:
            self._init_cuda()
        else:
            start = time.perf_counter()
            self.plan = plan_kv_cache(
                config,
                self.kv_bytes_per_block(),
                self.weight_bytes(),
                self.session_len,
                free=free_memory(self.device),
                activation_reserve=0,
                on_gpu=False,
            )
            self.kv_caches = self._allocate_kv(self.plan.num_blocks)
            self.phases["KV allocation"] = time.perf_counter() - start

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    # -- start-up on CUDA ------------------------------------------------------------------------------------------

    def _init_cuda(self) -> None:
        """The Triton path: GEMV linears and the Triton attention backend, input staging, the activation reserve
        measured, the KV cache planned and allocated, the decode graphs captured (each phase timed)."""
        from lm_torch.kernels.prefill_attention import tokens_per_tile
        from lm_torch.layers.cuda_linear import warm_up_gemms
        from lm_torch.step_inputs import EagerInputs, GraphInputs, PinnedStaging, eager_token_bucket

        cfg = self.config
        layers = self.model.attention_layers()
        self.tokens_per_tile = tokens_per_tile(layers[0].num_heads // layers[0].num_kv_heads, layers[0].head_dim)
        max_blocks_per_seq = -(-self.session_len // self.block_size)
        self.eager_inputs = EagerInputs(cfg.max_prefill_token_num, cfg.max_batch_size, max_blocks_per_seq, self.device)
        self.sampled_tokens = torch.zeros(cfg.max_batch_size, dtype=torch.int64, device=self.device)
        self.token_staging = PinnedStaging(cfg.max_batch_size, depth=3, dtype=torch.int64)

        start = time.perf_counter()
        reserve = self._measure_activation_reserve()  # also times the Triton compiles ("Triton compile")
        self.phases["memory profile"] = time.perf_counter() - start - self.phases["Triton compile"]
        start = time.perf_counter()
        buckets = sorted({eager_token_bucket(n) for n in range(1, cfg.max_prefill_token_num + 1)})
        warm_up_gemms(self.model, buckets)
        self.phases["GEMM warm-up"] = time.perf_counter() - start
        start = time.perf_counter()
        self.plan = plan_kv_cache(
            cfg,
            self.kv_bytes_per_block(),
            self.weight_bytes(),
            self.session_len,
            free=free_memory(self.device),
            activation_reserve=reserve,
            on_gpu=True,
        )
        self.kv_caches = self._allocate_kv(self.plan.num_blocks)
        torch.cuda.synchronize()
        self.phases["KV allocation"] = time.perf_counter() - start
        if not cfg.eager_mode:
            from lm_torch.cuda_graph import CudaGraphRunner

            self.graph_inputs = GraphInputs(cfg.max_batch_size, max_blocks_per_seq, self.device)
            self.graphs = CudaGraphRunner(
                self.model,
                self.kv_caches,
                self.graph_inputs,
                self.sampled_tokens,
                self.block_size,
                self.session_len,
                cfg.max_batch_size,
                cfg.cuda_graph_sizes,
            )
            self.phases["graph capture"] = self.graphs.capture()

    def _allocate_kv(self, num_blocks: int) -> list[KVCache]:
        # Zeroed: the torch backend reads whole blocks (masking what it does not need), and 0 * NaN would be NaN.
        policy = self.config.quant_policy
        return [
            allocate_kv_cache(num_blocks, self.block_size, heads, dim, policy, self.dtype, self.device)
            for heads, dim in self.model.kv_cache_shape()
        ]

    @torch.inference_mode()
    def _measure_activation_reserve(self) -> int:
        """Peak device memory of the largest steps, measured by running them: a `max_prefill_token_num`-token prompt
        with its prompt logprobs, logits and a sampler run with every stage on over `max_batch_size` rows, and a
        decode of `max_batch_size` rows (about what the CUDA graphs' pool holds). Compiles the kernels on the way."""
        from lm_core.generation_config import GenerationConfig
        from lm_torch.kernels.common import compile_ahead
        from lm_torch.sequence import Sequence

        cfg = self.config
        num_tokens = min(cfg.max_prefill_token_num, self.session_len)
        num_blocks = -(-num_tokens // self.block_size) + 1
        self.kv_caches = self._allocate_kv(num_blocks)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        worst = GenerationConfig(
            do_sample=True,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.1,
            frequency_penalty=0.5,
            logprobs=20,
            prompt_logprobs=20,
        )
        prompt = Sequence("profile-prefill", [1] * num_tokens, num_tokens, worst)
        prompt.block_table = list(range(num_blocks - 1))
        prefill = ScheduledBatch([prompt], [num_tokens], [True])
        rows = min(cfg.max_batch_size, num_tokens)
        decodes = []
        for i in range(cfg.max_batch_size):
            seq = Sequence(f"profile-decode-{i}", [1, 1], 1, GenerationConfig())
            seq.num_computed_tokens, seq.block_table = 1, [i % (num_blocks - 1)]
            decodes.append(seq)
        n = len(decodes)
        decode = ScheduledBatch(decodes, [1] * n, [True] * n)
        start = time.perf_counter()
        with compile_ahead():  # both steps' Triton kernels compiled at once, not one by one as the runs meet them
            self._forward_eager(prefill, [0] * rows)
            self._forward_eager(decode, list(range(n)))
        self.phases["Triton compile"] = time.perf_counter() - start
        hidden, full = self._forward_eager(prefill, [0] * rows)
        compute_prompt_logprobs(self.model, full, prefill, self.vocab_size).resolve(1)
        del full
        logits = self.model.compute_logits(hidden)
        inputs = SamplingInputs.build(
            [worst] * rows, [[1]] * rows, [[2]] * rows, None, self.vocab_size, self.device, [None] * rows
        )
        self.sampler(logits, inputs)
        del hidden, logits, inputs
        self._forward_eager(decode, list(range(n)))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del self.kv_caches
        torch.cuda.empty_cache()
        return peak

    # -- memory planning --------------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        policy = self.config.quant_policy
        return sum(
            self.block_size * bytes_per_token(heads, dim, policy, self.dtype)
            for heads, dim in self.model.kv_cache_shape()
        )

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """The start-up lines: model, dtype, device and load time; the memory plan; the CPU threads; the start-up's
        wall time (`wall_s`, the engine's whole construction, plus `import_s` when given: lm-torch's import) and each
        phase's seconds ("other": the part of the wall time no phase covers)."""
        lines = [
            f"lm-torch: {self.model_path.name} ({self.hf_config.architectures[0]}), "
            f"{str(self.dtype).removeprefix('torch.')} on {self.device}, "
            f"weights {self.weight_bytes() / 1024**3:.2f} GiB loaded in {self.phases['load']:.1f} s",
            f"lm-torch: {self.plan.summary()}, KV {kv_dtype_name(self.config.quant_policy, self.dtype)}",
        ]
        if self.graphs is not None:
            buckets = self.graphs.buckets
            lines.append(f"lm-torch: CUDA graphs for {len(buckets)} decode batch sizes ({buckets[0]}-{buckets[-1]})")
        elif self.device.type == "cuda":
            why = "eager_mode" if self.fast else "triton is not installed: torch attention, no Triton kernels"
            lines.append(f"lm-torch: no CUDA graphs ({why})")
        if self.device.type == "cpu":
            if self.thread_tuner is not None:
                counts = self.thread_tuner.candidates
                lines.append(
                    f"lm-torch: CPU threads chosen per step by timing ({counts[0]}-{counts[-1]}; fewer when other "
                    f"work holds cores; --num-threads fixes the count), starting at {self.thread_tuner.current}"
                )
            else:
                lines.append(f"lm-torch: CPU threads {torch.get_num_threads()} (num_threads)")
        phases = dict(self.phases)
        if import_s is not None:
            phases = {"import": import_s, **phases}
        total = sum(phases.values())
        if wall_s is not None:
            total = wall_s + (import_s or 0.0)
            phases["other"] = max(total - sum(phases.values()), 0.0)
        text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
        lines.append(f"lm-torch: start-up {total:.1f} s wall time ({text})")
        return "\n".join(lines)

    # -- one step ----------------------------------------------------------------------------------------------------

    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Launch and collect one step."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Queue `batch`'s forward pass and sampling (CUDA), or compute them (CPU)."""
        if not self.fast:
            return StepHandle(batch, output=self._run_tuned(batch))
        rows = [i for i, sample in enumerate(batch.sample) if sample]
        bucket = None
        embedding = any(s.is_embedding for s in batch.seqs)
        if self.graphs is not None and not embedding and all(n == 1 for n in batch.num_new_tokens):
            bucket = self.graphs.bucket_for(len(batch.seqs))
        embeddings = None
        if bucket is not None:
            from lm_torch.step_inputs import gather_step

            host = gather_step(batch, self.block_size, self._previous_rows)
            self.graph_inputs.upload(host, bucket)
            hidden = self.graphs.replay(bucket)[: len(batch.seqs)]  # [num_seqs, hidden]
            self._count(graph_steps=1, graph_rows=len(batch.seqs), graph_padding_rows=bucket - len(batch.seqs))
            # One token per sequence: these rows are every token of the step too.
            prompt_logprobs = compute_prompt_logprobs(self.model, hidden, batch, self.vocab_size)
            if len(rows) < len(batch.seqs):
                hidden = hidden.index_select(0, torch.tensor(rows).to(self.device, non_blocking=True))
        else:
            hidden, full = self._forward_eager(batch, rows)
            self._count(eager_steps=1, eager_tokens=batch.num_tokens)
            if embedding:
                embeddings = self._pool(batch, full)
            prompt_logprobs = compute_prompt_logprobs(self.model, full, batch, self.vocab_size)
        handle = StepHandle(batch, rows, embeddings=embeddings, prompt_logprobs=prompt_logprobs)
        if rows:
            self._sample(handle, hidden)
        self._previous_rows = {batch.seqs[i].request_id: r for r, i in enumerate(rows)}
        return handle

    def _count(self, **increments: int) -> None:
        for name, value in increments.items():
            self.counters[name] += value

    def collect(self, handle: StepHandle) -> StepOutput:
        """Wait for a launched step and return its tokens."""
        if handle.output is not None:
            return handle.output
        batch, rows = handle.batch, handle.sample_rows
        token_ids: list[int | None] = [None] * len(batch.seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(batch.seqs)
        if rows:
            handle.event.synchronize()
            sampled = handle.host_tokens[: len(rows)].tolist()
            for j in handle.guided_rows:
                # A rejected token sets the grammar's error: the scheduler then ends the request without emitting it.
                batch.seqs[rows[j]].grammar.accept(sampled[j])
            row_logprobs = handle.logprobs.resolve() if handle.logprobs is not None else None
            for j, i in enumerate(rows):
                token_ids[i] = sampled[j]
                logprobs[i] = row_logprobs[j] if row_logprobs is not None else None
        pending = handle.prompt_logprobs
        prompt_logprobs = pending.resolve(len(batch.seqs)) if pending is not None else None
        return StepOutput(token_ids, logprobs, handle.embeddings, prompt_logprobs)

    def _forward_eager(self, batch: ScheduledBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `batch` without a graph. Returns the final hidden states of the last token of each of `rows`
        [len(rows), hidden], and of every token [num_tokens, hidden]."""
        from lm_torch.attention.triton_backend import LAYOUT_KEY, StepLayout
        from lm_torch.step_inputs import (
            eager_token_bucket,
            gather_step,
            pad_host_step,
            resolve_input_ids,
            zero_padding,
            zero_padding_rows,
        )

        host = gather_step(batch, self.block_size, self._previous_rows)
        ends = host.query_start_loc[1:] - 1
        num_tokens = host.num_tokens
        host = pad_host_step(host, eager_token_bucket(num_tokens))  # few GEMM shapes (see the function)
        step = self.eager_inputs.upload(host, ends[rows].tolist(), self.tokens_per_tile)
        input_ids = resolve_input_ids(step.input_ids, step.sources, self.sampled_tokens)
        meta = AttentionMetadata(
            query_lens=host.query_lens,
            context_lens=host.context_lens_list,
            block_tables=step.block_tables,
            slot_mapping=step.slot_mapping,
            block_size=self.block_size,
            context_blocks=step.block_tables.new_empty(0),  # the torch backend's; the Triton one reads tables
            context_block_starts=[],
            query_start_loc=step.query_start_loc,
            context_lens_tensor=step.context_lens,
        )
        decodes = [ctx for n, ctx in zip(host.query_lens, host.context_lens_list, strict=True) if n == 1]
        zeroed = zero_padding() and host.num_tokens > num_tokens
        meta.cache[LAYOUT_KEY] = StepLayout(
            step.query_start_loc,
            step.context_lens,
            len(decodes),
            max(decodes, default=0),
            num_tokens=num_tokens if zeroed else None,
        )
        meta.cache[("triton_prefill_tiles", self.tokens_per_tile)] = (step.tile_seq, step.tile_first)
        with zero_padding_rows(self.model, num_tokens) if zeroed else contextlib.nullcontext():
            hidden = self.model(input_ids, step.positions, self.kv_caches, meta)  # [padded tokens, hidden]
        return hidden.index_select(0, step.sample_index), hidden

    def _sample(self, handle: StepHandle, hidden: torch.Tensor) -> None:
        """Sample one token per row of `hidden` [rows, hidden] into `sampled_tokens` and queue their copy to the
        host. Greedy rows with no other stage take the arg-max alone: no host work, no synchronisation."""
        seqs = [handle.batch.seqs[i] for i in handle.sample_rows]
        if all(self._is_plain_greedy(s) for s in seqs):
            tokens = argmax_rows(self.model.compute_logits(hidden, for_argmax=True)[:, : self.vocab_size])
        else:
            logits = self.model.compute_logits(hidden)  # [rows, vocab] float32
            out = self._sample_full(seqs, logits)
            tokens, handle.logprobs = out.token_ids, out.pending_logprobs  # read in `collect`
            handle.guided_rows = [j for j, s in enumerate(seqs) if s.grammar is not None]
        num = len(seqs)
        self.sampled_tokens[:num].copy_(tokens)
        host, _ = self.token_staging.acquire()
        host[:num].copy_(tokens, non_blocking=True)
        self.token_staging.mark_used(self.token_staging.current_index)
        handle.host_tokens, handle.event = host, self.token_staging.events[self.token_staging.current_index]

    def _sample_full(self, seqs, logits: torch.Tensor):
        """The whole `Sampler` (grammars, penalties, biases, bans, truncation, seeded draws, logprobs)."""
        guided = [row for row, s in enumerate(seqs) if s.grammar is not None]
        bitmask = None
        if guided:
            # Filled on the CPU while the device still runs the forward pass queued above.
            grammars, guided_seqs = [seqs[r].grammar for r in guided], [seqs[r] for r in guided]
            bitmask = fill_bitmasks(grammars, guided_seqs, self.vocab_size, self.device)
        inputs = SamplingInputs.build(
            [s.gen_config for s in seqs],
            [s.token_ids[: s.num_prompt_tokens] for s in seqs],
            [s.token_ids[s.num_prompt_tokens :] for s in seqs],
            [self.bad_words_ids.get(s.request_id, []) for s in seqs],
            self.vocab_size,
            self.device,
            [self._generator(s) for s in seqs],
            guided_rows=guided,
            guided_bitmask=bitmask,
        )
        return self.sampler(logits, inputs)

    def _is_plain_greedy(self, seq) -> bool:
        known = self._plain_greedy.get(seq.request_id)
        if known is None:
            known = self._plain_greedy[seq.request_id] = (
                is_plain_greedy(seq.gen_config) and seq.grammar is None and seq.request_id not in self.bad_words_ids
            )
        return known

    def _run_tuned(self, batch: ScheduledBatch) -> StepOutput:
        """`_run_plain` on the thread count the tuner picks, timed for it (without a tuner: as configured)."""
        tuner = self.thread_tuner
        if tuner is None:
            return self._run_plain(batch)
        threads = tuner.next_threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        start = time.perf_counter()
        output = self._run_plain(batch)
        tuner.record(threads, batch.num_tokens, time.perf_counter() - start)
        return output

    @torch.inference_mode()
    def _run_plain(self, batch: ScheduledBatch) -> StepOutput:
        """The step without Triton (CPU, or CUDA without triton): the torch attention backend, synchronous."""
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            chunk = seq.token_ids[start : start + num_new]
            if chunk[-1] < 0:  # a placeholder: the token the previous step sampled for this sequence
                chunk[-1] = self._last_sampled[seq.request_id]
            input_ids += chunk
            positions += range(start, start + num_new)
            context_lens.append(start + num_new)
        meta = AttentionMetadata.build(
            batch.num_new_tokens, context_lens, [s.block_table for s in batch.seqs], self.block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)  # [num_tokens, hidden]

        rows = [i for i, sample in enumerate(batch.sample) if sample]
        seqs = [batch.seqs[i] for i in rows]
        embeddings = self._pool(batch, hidden) if any(s.is_embedding for s in batch.seqs) else None
        pending = compute_prompt_logprobs(self.model, hidden, batch, self.vocab_size)
        prompt_logprobs = pending.resolve(len(batch.seqs)) if pending is not None else None
        token_ids: list[int | None] = [None] * len(batch.seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(batch.seqs)
        self._last_sampled = {}
        if not rows:
            return StepOutput(token_ids, logprobs, embeddings, prompt_logprobs)
        ends = torch.tensor(batch.num_new_tokens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[ends[rows]])  # [len(rows), vocab]
        out = self._sample_full(seqs, logits)
        sampled = out.token_ids.tolist()
        for row, seq in enumerate(seqs):
            if seq.grammar is not None:
                # A rejected token sets the grammar's error: the scheduler then ends the request without emitting it.
                seq.grammar.accept(sampled[row])
        for row, i in enumerate(rows):
            token_ids[i] = sampled[row]
            logprobs[i] = out.logprobs[row] if out.logprobs is not None else None
        self._last_sampled = {seq.request_id: token for seq, token in zip(seqs, sampled, strict=True)}
        return StepOutput(token_ids, logprobs, embeddings, prompt_logprobs)

    def _pool(self, batch: ScheduledBatch, hidden: torch.Tensor) -> list[list[float] | None]:
        """Pool the final hidden states (hidden: [num_tokens, hidden]) of the batch's embedding sequences: a vector
        for each whose prompt this step completes, None for the rest (the mean's running sum waits in
        `pooled_sums` between chunks)."""
        vectors: list[list[float] | None] = [None] * len(batch.seqs)
        start = 0
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            end, chunk_start = start + num_new, start
            start = end
            if not seq.is_embedding:
                continue
            is_last_chunk = seq.num_computed_tokens + num_new == seq.num_tokens
            if seq.pooling == "mean":
                chunk_sum = hidden[chunk_start:end].sum(dim=0, dtype=torch.float32)  # [hidden]
                # A chunk from position 0 starts the sum afresh: a preempted prompt is recomputed from scratch.
                if seq.num_computed_tokens > 0:
                    chunk_sum += self.pooled_sums[seq.request_id]
                if not is_last_chunk:
                    self.pooled_sums[seq.request_id] = chunk_sum
                    continue
                vector = chunk_sum / seq.num_tokens
            elif is_last_chunk:
                vector = hidden[end - 1].float()
            else:
                continue
            self.pooled_sums.pop(seq.request_id, None)
            if seq.normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            vectors[i] = vector.tolist()
        return vectors

    def _generator(self, seq) -> torch.Generator | None:
        seed = seq.gen_config.random_seed
        if seed is None:
            return None
        generator = self.generators.get(seq.request_id)
        if generator is None:
            # CPU generators: their draws are cheaper than CUDA ones, and the sampler accepts either.
            generator = torch.Generator().manual_seed(seed)
            self.generators[seq.request_id] = generator
        return generator

    def release(self, request_id: str) -> None:
        """Forget per-request state once a request has finished."""
        self.generators.pop(request_id, None)
        self.bad_words_ids.pop(request_id, None)
        self.pooled_sums.pop(request_id, None)
        self._plain_greedy.pop(request_id, None)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
