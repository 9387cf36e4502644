"""`TorchEngine`: the asynchronous engine loop over the scheduler and an executor (which runs the model).

One background task runs steps while requests are pending (`_run_loop`):

    batch = scheduler.schedule()              # plain value: what to compute, for whom, which blocks
    handle = await executor.launch(batch)
    result = await executor.collect(handle)   # plain value: the accepted tokens
    scheduler.update(batch, result)           # the one place tokens are appended and finish is decided

With overlap (CUDA with Triton, by default) the next step is scheduled and launched before the previous one is
collected, so the device never waits for the host between steps: the scheduler counts each sequence's tokens in
flight (`Sequence.num_pending_tokens`) and the runner reads them from its device token buffer. Steps are always
updated in launch order, with real token ids. The scheduler is only touched from the event loop.

Guided requests (`response_format`) have their grammar compiled before they are scheduled, on worker threads of a
`GrammarPool` (several at once, a time limit each, a cache), so a slow schema delays only its own request.
Embedding requests (`embed`) share the scheduler with generation: prefill-only sequences that finish with their
pooled vector. Prompt logprobs (`GenerationConfig.prompt_logprobs`) arrive chunk by chunk with the steps that
prefill the prompt and are emitted whole, with the request's first output after its prompt is computed.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_core.engine import POOLING_METHODS, Engine, EngineOutput, EngineRequest, EngineStats, session_length_error
from lm_core.generation_config import GenerationConfig
from lm_torch import IMPORT_STARTED, gc_tuning
from lm_torch.block_manager import BlockManager
from lm_torch.config import TorchEngineConfig
from lm_torch.executor import Executor, make_executor
from lm_torch.runner import log
from lm_torch.sampling.prompt_logprobs import PromptLogprobsChunk
from lm_torch.scheduler import ScheduledBatch, Scheduler, StepResult
from lm_torch.sequence import Sequence

if TYPE_CHECKING:
    from lm_torch.guided import GrammarPool

# Seconds lm-torch's import took (torch's included), not yet counted in any engine's start-up: the first engine
# built in a process reports them as its "import" phase.
_unreported_import_s: float | None = time.perf_counter() - IMPORT_STARTED


class OutputStream:
    """One request's outputs in order: the engine loop puts, the request's coroutine gets. A deque and at most one
    waiting future: asyncio.Queue's bounds and getter/putter bookkeeping cost more than the rest of a token's
    streaming, and a step streams one output to every sequence in it."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        """Queue `item` and wake the waiting reader."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self):
        """The next item, waiting for one if there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def replica_configs(config: TorchEngineConfig) -> list[TorchEngineConfig]:
    """The config of each of `dp` replicas: dp 1, and on CUDA the replica's own `tp` devices of the node's list
    (default 0, 1, ...), so replica i runs on devices [i * tp, (i + 1) * tp)."""
    par = config.parallel
    if par.nnodes > 1:
        raise ValueError("--dp with --nnodes > 1 is not supported: run one multi-node engine per replica instead")
    tp = par.tp
    devices = list(par.devices) if par.devices is not None else None
    if devices is not None and len(devices) != tp * par.dp:
        raise ValueError(f"--devices names {len(devices)} devices; --tp {tp} x --dp {par.dp} needs {tp * par.dp}")
    on_cuda = config.model.device == "cuda" or (config.model.device == "auto" and _cuda_available())
    if on_cuda and devices is None and tp * par.dp > _cuda_device_count():
        raise ValueError(
            f"--tp {tp} x --dp {par.dp} needs {tp * par.dp} CUDA devices, {_cuda_device_count()} visible "
            "(CUDA_VISIBLE_DEVICES)"
        )
    configs = []
    for i in range(par.dp):
        if on_cuda:
            own = devices[i * tp : (i + 1) * tp] if devices is not None else list(range(i * tp, (i + 1) * tp))
            configs.append(config.with_overrides(dp=1, devices=own))
        else:
            configs.append(config.with_overrides(dp=1))
    return configs


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _serve_ranks_only(model_path: Path, config: TorchEngineConfig) -> None:
    """A node other than 0 runs its tensor-parallel ranks and nothing else (no engine loop, no server): the same
    command runs on every node, and node 0's engine drives them all. Exits the process when the group ends."""
    from lm_torch.distributed.executor import run_node

    par = config.parallel
    first, last = par.node_rank * par.ranks_per_node, (par.node_rank + 1) * par.ranks_per_node - 1
    log(
        f"lm-torch: node {par.node_rank} of {par.nnodes}: tensor-parallel ranks {first}-{last}"
        f" for node 0 at {par.dist_init_addr}; this node serves nothing and exits when the group ends"
    )
    raise SystemExit(run_node(model_path, config))


class TorchEngine(Engine):
    """The PyTorch engine: paged KV cache, continuous batching, chunked prefill, prefix caching; CPU or CUDA."""

    priority = 10

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        global _unreported_import_s
        started = time.perf_counter()
        import_s, _unreported_import_s = _unreported_import_s, None
        log(f"lm-torch: loading {model_path}")
        self.config = config
        if config.parallel.node_rank > 0:
            _serve_ranks_only(model_path, config)
        self.executor: Executor = make_executor(model_path, config)
        num_blocks = self.executor.num_blocks
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        # One sequence can never hold more KV than the whole cache: a longer session could only end in an error after
        # running for nothing, so the session length (what lm-core checks requests against, and /v1/models reports)
        # is at most the cache's capacity in tokens.
        session_len = config.scheduler.session_len or self.executor.max_position_embeddings
        self._kv_capacity = num_blocks * config.cache.block_size
        self._session_len = min(session_len, self._kv_capacity)
        if self._session_len < session_len:
            log(
                f"lm-torch: session length {self._session_len} tokens, what the KV cache holds "
                f"({num_blocks} blocks of {config.cache.block_size}), instead of {session_len}"
            )
        runs_ahead = self.executor.runs_ahead
        self.scheduler = Scheduler(
            self.block_manager,
            max_batch_size=config.scheduler.max_batch_size,
            max_num_batched_tokens=config.scheduler.max_prefill_token_num,
            session_len=self._session_len,
            prefill_interval=config.scheduler.prefill_interval if runs_ahead else 0,
            max_encoder_tokens=config.scheduler.max_encoder_tokens,
        )
        # Steps launched and not yet collected, at most: 2 with overlap (the next step is queued while one runs).
        overlap = config.cuda.overlap_steps if config.cuda.overlap_steps is not None else runs_ahead
        self._depth = 2 if overlap else 1
        self._streams: dict[str, OutputStream] = {}
        # Prompt logprobs gathered so far (index i: prompt token i; the first is None), until they are emitted.
        self._prompt_logprobs: dict[str, list[dict[int, float] | None]] = {}
        # For benchmarks: steps run, those launched while another was in flight, and the seconds the loop waited for
        # results (near the run's length when the device is the bottleneck, near 0 when the host is).
        self.step_counters = {"steps": 0, "overlapped_steps": 0, "wait_s": 0.0}
        # For benchmarks: set to a list to record each step (times, rows, tokens; see `_trace`).
        self.step_trace: list[tuple] | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._tokenizer = None
        # Guided decoding, created with the first guided request: xgrammar may be absent.
        self._grammar_pool: GrammarPool | None = None
        self._compiling: set[str] = set()  # request ids whose grammar is being compiled
        self._aborted_while_compiling: set[str] = set()
        self._gc_tuned = config.runtime.gc_tuning
        if self._gc_tuned:
            gc_tuning.tune()
        log(self.executor.summary(time.perf_counter() - started, import_s))

    @property
    def runner(self):
        """The in-process executor's `ModelRunner` (for tests and benchmarks)."""
        return self.executor.runner  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], config: Any = None) -> Engine:
        """Load a Hugging Face directory (or a .gguf file / hub id, resolved by lm-core first). With `dp` > 1: that
        many engines (each of `tp` ranks, on its own devices) behind lm-core's `DataParallelEngine`."""
        from lm_core.resolve import resolve_model

        path, engine_config = resolve_model(model_path), TorchEngineConfig.from_any(config)
        if engine_config.parallel.dp == 1:
            return cls(path, engine_config)
        from lm_core.data_parallel import DataParallelEngine

        replicas: list[TorchEngine] = []
        try:
            for replica_config in replica_configs(engine_config):
                replicas.append(cls(path, replica_config))
        except BaseException:
            for replica in replicas:  # no step has run: only the workers hold anything
                replica.executor.shutdown()
            raise
        return DataParallelEngine(list(replicas))

    @classmethod
    def supports(cls, model_path: str | os.PathLike[str]) -> bool:
        """Whether config.json names an architecture this engine implements."""
        import json

        from lm_torch.models.registry import MODEL_REGISTRY

        architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
        return bool(architectures) and architectures[0] in MODEL_REGISTRY

    @property
    def session_len(self) -> int:
        """Longest prompt + generation a request may have: the configured length, capped by the KV cache."""
        return self._session_len

    # -- requests --------------------------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream `request`'s outputs; an unfinished request is aborted when its consumer stops reading."""
        error = self._validate(request)
        if error is not None:
            yield EngineOutput(request.request_id, [], "error", error=error)
            return
        if request.request_id in self._streams:
            yield EngineOutput(request.request_id, [], "error", error=f"request id {request.request_id!r} is in use")
            return
        wake = self._ensure_loop()
        queue = self._streams[request.request_id] = OutputStream()
        seq = Sequence.from_request(request)
        if request.gen_config.prompt_logprobs is not None:
            self._prompt_logprobs[request.request_id] = [None]
        finished = False
        try:
            if request.gen_config.response_format is not None:
                failure = await self._attach_grammar(seq, request.gen_config.response_format)
                if failure is not None:
                    finished = True
                    yield failure
                    return
            self.scheduler.add(seq)
            wake.set()
            while True:
                output: EngineOutput = await queue.get()
                finished = output.finish_reason is not None
                yield output
                if finished:
                    break
        finally:
            # The one place a request is aborted when its consumer goes away (or the engine closes).
            self._streams.pop(request.request_id, None)
            self._prompt_logprobs.pop(request.request_id, None)
            if not finished:
                self._apply_abort(request.request_id)

    def _validate(self, request: EngineRequest) -> str | None:
        cfg, num_prompt = request.gen_config, len(request.prompt_token_ids)
        if self.executor.failure is not None:  # the workers are gone: nothing can run
            return self.executor.failure
        if request.multimodal:
            if not self.executor.takes_media:
                return "this model takes text only: multimodal inputs (images, video, audio) are not supported"
            from lm_core.multimodal import check_items

            try:
                check_items(request.multimodal, num_prompt)
            except ValueError as error:
                return str(error)
        if request.adapter_name is not None:
            return f"this engine serves no adapters (LoRA): adapter_name {request.adapter_name!r} is not supported"
        vocab = self.executor.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            return f"prompt token ids must be in [0, {vocab})"
        too_long = session_length_error(num_prompt, cfg.max_new_tokens, self._session_len)
        if too_long is not None:
            held = " (what the KV cache holds)" if self._session_len == self._kv_capacity else ""
            return too_long + held
        if cfg.bad_words and request.bad_word_ids is None:
            return "bad_words must reach the engine tokenized, as bad_word_ids (lm-core's pipeline does that)"
        if cfg.response_format is not None:
            from lm_torch.guided import xgrammar_available

            if not xgrammar_available():
                return "response_format (guided decoding) needs xgrammar, which is not installed: pip install xgrammar"
            if cfg.min_new_tokens:
                return (
                    "response_format with min_new_tokens > 0 is not supported: the grammar alone decides where the "
                    "output may end"
                )
        if cfg.n != 1:
            return "the engine takes n == 1 per request (lm-core fans out n > 1)"
        return None

    def _hf_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.executor.model_path)
        return self._tokenizer

    async def _attach_grammar(self, seq: Sequence, response_format: dict[str, Any]) -> EngineOutput | None:
        """Compile the request's response_format off the event loop and give `seq` its grammar state. Returns the
        request's final output instead when it cannot run: an invalid or too slow format ("error") or an abort
        meanwhile."""
        from lm_torch.guided import GrammarState

        request_id = seq.request_id
        self._compiling.add(request_id)
        try:
            cfg = seq.gen_config
            compiled = await self.grammar_pool().compile(response_format)
            stop = [t for t in cfg.stop_token_ids or () if 0 <= t < self.executor.vocab_size]
            seq.set_grammar(GrammarState(compiled, stop or None))  # a matcher costs microseconds
        except ValueError as exc:
            return EngineOutput(request_id, [], "error", error=str(exc))
        except Exception as exc:  # xgrammar failing in an unexpected way must not take the engine down
            return EngineOutput(request_id, [], "error", error=f"response_format: {type(exc).__name__}: {exc}")
        finally:
            self._compiling.discard(request_id)
            aborted = request_id in self._aborted_while_compiling
            self._aborted_while_compiling.discard(request_id)
        return EngineOutput(request_id, [], "abort") if aborted else None

    def grammar_pool(self) -> GrammarPool:
        """The engine's `GrammarPool` (compiles and caches response formats), created on first use."""
        if self._grammar_pool is None:
            from lm_torch.guided import GrammarBackend, GrammarPool

            def make_backend() -> GrammarBackend:  # on a worker thread: loads the tokenizer, builds xgrammar's tables
                return GrammarBackend(self._hf_tokenizer(), self.executor.vocab_size)

            self._grammar_pool = GrammarPool(make_backend, self.config.runtime.grammar_compile_timeout)
        return self._grammar_pool

    # -- embeddings ------------------------------------------------------------------------------------------------

    async def embed(self, prompt_token_ids: list[int], pooling: str = "mean", normalize: bool = True) -> list[float]:
        """Pooled final hidden states of the prompt (see `Engine.embed`), computed by the same scheduler as
        generation: chunked like any prompt, batched with whatever runs, never sampled, never served from the
        prefix cache; its KV blocks are released as soon as the vector is out."""
        ids = list(prompt_token_ids)
        error = self._validate_embedding(ids, pooling, normalize)
        if error is not None:
            raise ValueError(error)
        request_id = f"embed-{uuid.uuid4().hex}"
        wake = self._ensure_loop()
        queue = self._streams[request_id] = OutputStream()
        seq = Sequence(request_id, ids, len(ids), GenerationConfig(), pooling=pooling, normalize=normalize)
        done = False
        try:
            self.scheduler.add(seq)
            wake.set()
            result = await queue.get()
            done = True
        finally:
            self._streams.pop(request_id, None)
            if not done:  # the caller was cancelled: free the request's blocks
                self._apply_abort(request_id)
        if isinstance(result, EngineOutput):  # aborted (engine closing) or failed
            raise RuntimeError(f"the embedding request ended with {result.finish_reason!r}: {result.error or ''}")
        return result

    def _validate_embedding(self, ids: list[int], pooling: str, normalize: bool) -> str | None:
        if pooling not in POOLING_METHODS:
            return f"pooling must be one of {', '.join(POOLING_METHODS)}, got {pooling!r}"
        if not isinstance(normalize, bool):
            return f"normalize must be True or False, got {normalize!r}"
        if not ids:
            return "prompt_token_ids is empty: there is nothing to embed"
        vocab = self.executor.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            return f"prompt_token_ids must be integers in [0, {vocab})"
        if len(ids) > self._session_len:
            return f"the prompt has {len(ids)} tokens; the session length is {self._session_len}"
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) > capacity:
            return f"the prompt has {len(ids)} tokens but the KV cache holds only {capacity}"
        return None

    async def abort(self, request_id: str) -> None:
        """End `request_id` now with "abort"."""
        self._apply_abort(request_id)

    def _apply_abort(self, request_id: str) -> None:
        """End a request with "abort" now: its blocks are released at once (a step still running on them only
        writes KV nobody reads; its tokens for the request are dropped by `Scheduler.update`)."""
        if request_id in self._compiling:  # not scheduled yet: its stream ends once the compile returns
            self._aborted_while_compiling.add(request_id)
            return
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._emit(EngineOutput(request_id, [], "abort", num_cached_tokens=seq.num_cached_tokens))

    @property
    def failure(self) -> str | None:
        """The executor's failure (a dead worker group), None while it runs."""
        return self.executor.failure

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV-cache use and prefix-cache hit rate."""
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=bm.usage(),
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate(),
        )

    async def close(self) -> None:
        """Abort every request, stop the step loop and release the workers."""
        for request_id in list(self._streams):
            self._apply_abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        # Grammar compiles still running (past their time limit) are not waited for: they end on their own threads.
        self.executor.shutdown()
        if self._gc_tuned:
            self._gc_tuned = False
            gc_tuning.release()

    # -- the loop --------------------------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.Event:
        """Start the step loop if it is not running; returns the event that wakes it."""
        if self._loop_task is None or self._loop_task.done() or self._wake is None:
            self._wake = wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(wake))
            self._loop_task.add_done_callback(self._loop_ended)
            return wake
        return self._wake

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The step loop ended: if by an exception (a bug), log it and end every request with "error" rather than
        leave their streams waiting."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        log("lm-torch: the step loop failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
        for request_id in list(self._streams):
            self.scheduler.abort(request_id)
            self._emit(EngineOutput(request_id, [], "error", error=f"{type(exc).__name__}: {exc}"))

    async def _run_loop(self, wake: asyncio.Event) -> None:
        """Steps while there is work: launch while fewer than `_depth` steps are in flight and the scheduler has a
        batch, else collect the oldest step and record it."""
        in_flight: deque[tuple[ScheduledBatch, Any, float]] = deque()
        while True:
            if len(in_flight) < self._depth and (batch := self._schedule()) is not None:
                t_scheduled = time.perf_counter()
                in_flight.append((batch, await self._launch(batch), t_scheduled))
                self.step_counters["overlapped_steps"] += len(in_flight) > 1
                continue  # queue the next step before waiting: the device never idles
            if not in_flight:
                await self._idle(wake)
                continue
            batch, handle, t_scheduled = in_flight.popleft()
            self._record(batch, await self._collect(handle))
            if self.step_trace is not None:
                self._trace(batch, t_scheduled)
            if not in_flight:
                await asyncio.sleep(0)  # let streams hand their tokens on

    def _schedule(self) -> ScheduledBatch | None:
        if not self.scheduler.has_unfinished_requests:
            return None
        batch = self.scheduler.schedule()
        # Requests the scheduler refused outright (more KV than the whole cache) end here, with their reason.
        self._emit_finished(self.scheduler.take_finished())
        return None if batch.is_empty else batch

    async def _idle(self, wake: asyncio.Event) -> None:
        if self.scheduler.has_unfinished_requests:
            await asyncio.sleep(0)
        else:
            wake.clear()
            await wake.wait()

    def _trace(self, batch: ScheduledBatch, t_scheduled: float) -> None:
        """One row of `step_trace`: when the step was scheduled and recorded, with its sequences, tokens and decode
        rows (a step with prefill chunks has tokens > decode rows)."""
        if self.step_trace is None:
            return
        now = time.perf_counter()
        self.step_trace.append((t_scheduled, t_scheduled, now, len(batch.seqs), batch.num_tokens, batch.num_decodes))

    async def _launch(self, batch: ScheduledBatch) -> Any:
        try:
            return await self.executor.launch(batch)
        except Exception as exc:  # a failed step must not hang the requests in it
            return exc

    async def _collect(self, handle: Any) -> StepResult | Exception:
        if isinstance(handle, Exception):
            return handle
        start = time.perf_counter()
        try:
            return await self.executor.collect(handle)
        except Exception as exc:
            return exc
        finally:
            self.step_counters["steps"] += 1
            self.step_counters["wait_s"] += time.perf_counter() - start

    def _record(self, batch: ScheduledBatch, result: StepResult | Exception) -> None:
        """Apply a step's result through `Scheduler.update` and stream what it produced."""
        if isinstance(result, Exception):
            self._fail(batch, result)
            return
        if result.prompt_logprobs is not None:
            self._add_prompt_logprobs(batch, result.prompt_logprobs)
        for row, seq, num_new in self.scheduler.update(batch, result):
            if seq.is_embedding:
                self._emit_embedding(seq, result.embeddings[row] if result.embeddings else None)
                continue
            tokens = result.sampled_token_ids[row][:num_new]
            logprobs = result.logprobs[row]
            prompt_logprobs = None
            if self._prompt_logprobs and batch.starts[row] + batch.num_new_tokens[row] >= seq.num_prompt_tokens:
                prompt_logprobs = self._prompt_logprobs.pop(seq.request_id, None)
            self._emit(
                EngineOutput(
                    seq.request_id,
                    tokens,
                    seq.finish_reason,
                    logprobs=logprobs[:num_new] if logprobs is not None and tokens else None,
                    prompt_logprobs=prompt_logprobs,
                    num_cached_tokens=seq.num_cached_tokens,
                    error=seq.error,
                )
            )

    def _add_prompt_logprobs(self, batch: ScheduledBatch, chunks: list[PromptLogprobsChunk | None]) -> None:
        """Append a step's prompt logprobs to what each sequence gathered. A chunk from the prompt's start (a sequence
        recomputed after a preemption) starts over; one for a request whose prompt logprobs went out already (its
        recompute) is dropped."""
        for request_id, chunk in zip(batch.request_ids, chunks, strict=True):
            gathered = self._prompt_logprobs.get(request_id)
            if chunk is not None and gathered is not None:
                del gathered[chunk.first :]
                gathered.extend(chunk.entries)

    def _fail(self, batch: ScheduledBatch, exc: Exception) -> None:
        """End a batch's sequences with "error" after its step raised `exc` (logged with its traceback: a bug)."""
        log("lm-torch: a step failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
        for seq in batch.seqs:
            if self.scheduler.abort(seq.request_id) is not None:
                self._emit(EngineOutput(seq.request_id, [], "error", error=f"{type(exc).__name__}: {exc}"))

    def _emit_embedding(self, seq: Sequence, vector: list[float] | None) -> None:
        queue = self._streams.get(seq.request_id)
        if queue is None:
            return
        if vector is None:  # cannot happen while runner and scheduler agree on when a prompt is complete
            queue.put(
                EngineOutput(seq.request_id, [], "error", error="the engine finished the prompt without a vector")
            )
            return
        queue.put(vector)

    def _emit_finished(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._emit(EngineOutput(seq.request_id, [], seq.finish_reason or "error", error=seq.error))

    def _emit(self, output: EngineOutput) -> None:
        queue = self._streams.get(output.request_id)
        if queue is not None:
            queue.put(output)
