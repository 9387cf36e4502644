"""`ModelRunner`: owns the model, the paged KV cache and the sampler; runs one scheduled batch per call."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_torch.attention import AttentionMetadata, TorchAttentionBackend
from lm_torch.config import TorchEngineConfig
from lm_torch.guided import fill_bitmasks
from lm_torch.layers.linear import use_cpu_linears
from lm_torch.loader import build_model, load_hf_config, resolve_device, resolve_dtype
from lm_torch.sampling import Sampler, SamplingInputs
from lm_torch.scheduler import ScheduledBatch


@dataclass
class StepOutput:
    """Per sequence of the batch: the sampled token (None where the step ended mid-prompt) and its logprobs; for an
    embedding sequence whose prompt this step completed, its pooled vector (None everywhere else)."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None]
    embeddings: list[list[float] | None] | None = None


class ModelRunner:
    """Builds the flat batch tensors for a `ScheduledBatch`, runs the model and samples."""

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        start = time.perf_counter()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_path = model_path
        self.hf_config = load_hf_config(model_path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.model = build_model(model_path, config, self.hf_config, self.device, self.dtype)
        if self.device.type == "cpu":
            use_cpu_linears(self.model)
        self.load_seconds = time.perf_counter() - start
        self.vocab_size = self.hf_config.vocab_size
        self.block_size = config.block_size
        backend = TorchAttentionBackend()
        for layer in self.model.attention_layers():
            layer.backend = backend
        self.num_blocks = self._plan_kv_blocks()
        self.kv_caches = [
            (
                torch.zeros(self.num_blocks, self.block_size, heads, dim, dtype=self.dtype, device=self.device),
                torch.zeros(self.num_blocks, self.block_size, heads, dim, dtype=self.dtype, device=self.device),
            )
            for heads, dim in self.model.kv_cache_shape()
        ]
        self.sampler = Sampler()
        # One generator per seeded request, advanced only by that request's draws: seeded output is independent of
        # whatever else shares the batch.
        self.generators: dict[str, torch.Generator] = {}
        self.bad_words_ids: dict[str, list[list[int]]] = {}
        # Mean pooling over a chunked prompt: the running float32 sum of the final hidden states computed so far.
        self.pooled_sums: dict[str, torch.Tensor] = {}

    # -- memory planning --------------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return sum(2 * self.block_size * heads * dim * element for heads, dim in self.model.kv_cache_shape())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _plan_kv_blocks(self) -> int:
        cfg, per_block = self.config, self.kv_bytes_per_block()
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_gb is not None:
            budget = cfg.kv_cache_gb * 1024**3
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cfg.cache_max_entry_count
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(available * cfg.cache_max_entry_count, cfg.cpu_kv_cache_gb * 1024**3)
        # Never more than the blocks the longest session could use times the batch size: no point holding more.
        session_len = cfg.session_len or self.hf_config.max_position_embeddings
        useful = cfg.max_batch_size * (session_len // self.block_size + 1)
        num_blocks = min(int(budget // per_block), useful)
        if num_blocks < 2:
            raise ValueError(f"the KV-cache budget ({budget / 1024**2:.0f} MiB) holds fewer than two blocks")
        return num_blocks

    def summary(self) -> str:
        """The start-up line: model, dtype, device, weights, KV blocks and the tokens they hold."""
        kv_gib = self.num_blocks * self.kv_bytes_per_block() / 1024**3
        return (
            f"lm-torch: {self.model_path.name} ({self.hf_config.architectures[0]}), "
            f"{str(self.dtype).removeprefix('torch.')} on {self.device}, "
            f"weights {self.weight_bytes() / 1024**3:.2f} GiB loaded in {self.load_seconds:.1f} s, "
            f"KV cache {self.num_blocks} blocks x {self.block_size} = {self.num_blocks * self.block_size} tokens "
            f"({kv_gib:.2f} GiB)"
        )

    # -- one step ----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + num_new]
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
        guided = [row for row, s in enumerate(seqs) if s.grammar is not None]
        # Grammar masks are filled on the CPU here, while a CUDA device still runs the forward pass queued above.
        bitmask = None
        if guided:
            grammars, guided_seqs = [seqs[r].grammar for r in guided], [seqs[r] for r in guided]
            bitmask = fill_bitmasks(grammars, guided_seqs, self.vocab_size, self.device)
        embeddings = self._pool(batch, hidden) if any(s.is_embedding for s in batch.seqs) else None
        token_ids: list[int | None] = [None] * len(batch.seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(batch.seqs)
        if not rows:
            return StepOutput(token_ids, logprobs, embeddings)
        ends = torch.tensor(batch.num_new_tokens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[ends[rows]])  # [len(rows), vocab]
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
        out = self.sampler(logits, inputs)
        sampled = out.token_ids.tolist()
        for row in guided:
            # A rejected token sets the grammar's error: the scheduler then ends the request without emitting it.
            seqs[row].grammar.accept(sampled[row])
        for row, i in enumerate(rows):
            token_ids[i] = sampled[row]
            logprobs[i] = out.logprobs[row] if out.logprobs is not None else None
        return StepOutput(token_ids, logprobs, embeddings)

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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
