"""`SamplingInputs`: one step's sampling tensors for the batch rows that sample, built from per-request configs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from lm_core.generation_config import GenerationConfig
from lm_torch.sampling import ops

# A token id sequence: a list, or a 1-D integer tensor (a caller may cache a request's prompt as one).
TokenIds = Sequence[int] | torch.Tensor


@dataclass
class SamplingInputs:
    """Per-batch tensors (on the logits' device) built once per step from each row's `GenerationConfig`.

    Every stage has a flag or a `None` tensor so that the sampler skips it when no row of the batch uses it.
    Penalty tensors cover only `penalty_rows`, the rows with a penalty on, to keep the `[rows, vocab]` work small.
    """

    batch_size: int
    vocab_size: int
    greedy: list[bool]  # per row: the row takes the arg-max
    sample_rows: torch.Tensor | None  # [S] int64 rows that sample, when some but not all do
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor | None  # [batch] float32, 1.0 on greedy rows; None when every row has 1.0
    top_k: torch.Tensor | None  # [batch] int64, 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # [batch] float32, 1.0 = off; None when no row uses it
    truncate_rows: torch.Tensor | None  # [rows] int64 with top-k or top-p (None: all rows, or none use them)
    candidate_width: int  # how many most likely tokens top-k / top-p rank (see ops.candidate_width)
    min_p: torch.Tensor | None  # [batch] float32, 0.0 = off; None when no row uses it
    penalty_rows: torch.Tensor | None  # [P] int64: rows with any penalty (None: all rows, or no penalties at all)
    repetition_penalty: torch.Tensor | None  # [P] float32
    seen_mask: torch.Tensor | None  # [P, vocab] bool: token occurs in the prompt or the output
    frequency_penalty: torch.Tensor | None  # [P] float32
    presence_penalty: torch.Tensor | None  # [P] float32
    output_counts: torch.Tensor | None  # [P, vocab] float32: occurrences of each token in the output
    bias_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows [n], tokens [n]) of logit_bias entries
    bias_values: torch.Tensor | None  # [n] float32
    ban_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows [m], tokens [m]) set to -inf
    generators: list[torch.Generator | None]  # per row; None rows share the sampler's default generator
    logprobs: list[int | None]  # per row: top-N logprobs asked for, None when not asked
    # Guided decoding: bitmask row j holds the tokens batch row guided_rows[j] may take (see ops.apply_token_bitmask).
    guided_rows: torch.Tensor | None = None  # [G] int64 (None: every row, when guided_bitmask is set)
    guided_bitmask: torch.Tensor | None = None  # [G, ceil(vocab / 32)] int32; None when no row is guided

    @property
    def any_penalty(self) -> bool:
        """Whether some row has a repetition, frequency or presence penalty."""
        return self.seen_mask is not None or self.output_counts is not None

    @classmethod
    def build(
        cls,
        configs: list[GenerationConfig],
        prompt_token_ids: list[TokenIds],
        output_token_ids: list[TokenIds],
        bad_words_ids: list[list[list[int]] | None] | None,
        vocab_size: int,
        device: torch.device | str,
        generators: list[torch.Generator | None],
        *,
        guided_rows: list[int] | None = None,
        guided_bitmask: torch.Tensor | None = None,
    ) -> SamplingInputs:
        """Tensors for one step; row i samples the next token of a request with `configs[i]`.

        `guided_bitmask` ([len(guided_rows), ceil(vocab_size / 32)] int32, on `device`) restricts rows `guided_rows`
        to the tokens their grammars allow, before every other stage.

        `bad_words_ids[i]` are row i's bad words, each pre-tokenized to a token id sequence. `generators[i]` is row
        i's own generator when its request is seeded (created from the seed when the request starts, used for nothing
        else): a CPU `torch.Generator` costs a few microseconds a step, a CUDA one a kernel launch. Token ids at or past
        `vocab_size` in biases, bans and stop ids are ignored here (they can't be sampled): reject them up front with
        `validate_config`.
        """
        batch = len(configs)
        row_bad_words: list[list[list[int]] | None] = bad_words_ids if bad_words_ids is not None else [None] * batch
        lengths = {len(prompt_token_ids), len(output_token_ids), len(row_bad_words), len(generators)}
        if lengths != {batch}:
            raise ValueError(f"SamplingInputs.build: per-row lists differ in length from {batch} configs")
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        device = torch.device(device)

        def floats(values: list[float]) -> torch.Tensor:
            return host_tensor(values, torch.float32, device)

        greedy = [c.is_greedy for c in configs]
        sampling = [c for c, g in zip(configs, greedy, strict=True) if not g]
        # Greedy rows ignore temperature and truncation: neutral values let those stages skip them.
        temperature = [1.0 if g else c.temperature for c, g in zip(configs, greedy, strict=True)]
        top_k = [0 if g or c.top_k >= vocab_size else c.top_k for c, g in zip(configs, greedy, strict=True)]
        top_p = [1.0 if g else c.top_p for c, g in zip(configs, greedy, strict=True)]
        min_p = [0.0 if g else c.min_p for c, g in zip(configs, greedy, strict=True)]
        truncate_rows = [i for i, (k, p) in enumerate(zip(top_k, top_p, strict=True)) if k or p < 1.0]
        top_p_without_top_k = any(p < 1.0 and not k for k, p in zip(top_k, top_p, strict=True))

        inputs = cls(
            batch_size=batch,
            vocab_size=vocab_size,
            greedy=greedy,
            sample_rows=_rows([i for i, g in enumerate(greedy) if not g], batch, device),
            all_greedy=not sampling,
            any_greedy=len(sampling) < batch,
            temperature=floats(temperature) if any(t != 1.0 for t in temperature) else None,
            top_k=host_tensor(top_k, torch.int64, device) if any(top_k) else None,
            top_p=floats(top_p) if any(p < 1.0 for p in top_p) else None,
            truncate_rows=_rows(truncate_rows, batch, device),
            candidate_width=ops.candidate_width(max(top_k, default=0), top_p_without_top_k, vocab_size),
            min_p=floats(min_p) if any(min_p) else None,
            penalty_rows=None,
            repetition_penalty=None,
            seen_mask=None,
            frequency_penalty=None,
            presence_penalty=None,
            output_counts=None,
            bias_index=None,
            bias_values=None,
            ban_index=None,
            generators=list(generators),
            logprobs=[c.logprobs for c in configs],
        )
        if guided_bitmask is not None:
            rows = list(range(batch)) if guided_rows is None else list(guided_rows)
            if guided_bitmask.dim() != 2 or guided_bitmask.shape[0] != len(rows):
                raise ValueError(
                    f"SamplingInputs.guided_bitmask has shape {tuple(guided_bitmask.shape)} for {len(rows)} guided rows"
                )
            if guided_bitmask.shape[1] * 32 < vocab_size:
                raise ValueError(
                    f"SamplingInputs.guided_bitmask covers {guided_bitmask.shape[1] * 32} tokens, fewer than the "
                    f"vocabulary of {vocab_size}"
                )
            inputs.guided_rows = _rows(rows, batch, device)
            inputs.guided_bitmask = guided_bitmask
        inputs._build_penalties(configs, prompt_token_ids, output_token_ids, device)
        inputs._build_bias_and_bans(configs, prompt_token_ids, output_token_ids, row_bad_words, device)
        return inputs

    def _build_penalties(
        self, configs: list[GenerationConfig], prompts: list[TokenIds], outputs: list[TokenIds], device: torch.device
    ) -> None:
        def has_penalty(c: GenerationConfig) -> bool:
            return c.repetition_penalty != 1.0 or c.frequency_penalty != 0.0 or c.presence_penalty != 0.0

        rows = [i for i, c in enumerate(configs) if has_penalty(c)]
        if not rows:
            return
        self.penalty_rows = _rows(rows, self.batch_size, device)
        # Row p of the penalty tensors is batch row rows[p].
        rep = [configs[i].repetition_penalty for i in rows]
        if any(r != 1.0 for r in rep):
            self.repetition_penalty = host_tensor(rep, torch.float32, device)
            # Like transformers, the repetition penalty covers the prompt as well as the output.
            pairs = [(p, ids) for p, i in enumerate(rows) if rep[p] != 1.0 for ids in (prompts[i], outputs[i])]
            self.seen_mask = _scatter_tokens(pairs, len(rows), self.vocab_size, torch.bool, device)
        freq = [configs[i].frequency_penalty for i in rows]
        pres = [configs[i].presence_penalty for i in rows]
        if any(freq) or any(pres):
            self.frequency_penalty = host_tensor(freq, torch.float32, device)
            self.presence_penalty = host_tensor(pres, torch.float32, device)
            # Presence and frequency penalties count the generated tokens only (OpenAI's definition).
            pairs = [(p, outputs[i]) for p, i in enumerate(rows) if freq[p] or pres[p]]
            self.output_counts = _scatter_tokens(pairs, len(rows), self.vocab_size, torch.float32, device)

    def _build_bias_and_bans(
        self,
        configs: list[GenerationConfig],
        prompts: list[TokenIds],
        outputs: list[TokenIds],
        bad_words_ids: list[list[list[int]] | None],
        device: torch.device,
    ) -> None:
        vocab = self.vocab_size
        bias_rows, bias_tokens, bias_values = [], [], []
        ban_rows, ban_tokens = [], []
        for row, cfg in enumerate(configs):
            for token, value in (cfg.logit_bias or {}).items():
                if token < vocab:
                    bias_rows.append(row)
                    bias_tokens.append(token)
                    bias_values.append(value)
            banned = list(cfg.bad_token_ids or [])
            if cfg.min_new_tokens and len(outputs[row]) < cfg.min_new_tokens:
                # Stop ids hold EOS unless ignore_eos (lm-core merged them), so ignore_eos leaves EOS unmasked here.
                banned += cfg.stop_token_ids or []
            for word in bad_words_ids[row] or []:
                # A bad word's last token is banned when the sequence so far ends with the rest of the word.
                if word and _ends_with(prompts[row], outputs[row], word[:-1]):
                    banned.append(word[-1])
            banned = [t for t in banned if t < vocab]
            ban_rows += [row] * len(banned)
            ban_tokens += banned
        if bias_rows:
            self.bias_index = (_ids(bias_rows, device), _ids(bias_tokens, device))
            self.bias_values = host_tensor(bias_values, torch.float32, device)
        if ban_rows:
            self.ban_index = (_ids(ban_rows, device), _ids(ban_tokens, device))


def is_plain_greedy(config: GenerationConfig) -> bool:
    """Whether a request's next token is the bare arg-max of its logits: greedy, and no stage of the sampler that
    changes logits or reports them (penalties, biases, bans, min_new_tokens, grammar, logprobs). The model runner
    samples such rows on the device with one arg-max, skipping `SamplingInputs`."""
    return (
        config.is_greedy
        and config.logprobs is None
        and config.repetition_penalty == 1.0
        and config.frequency_penalty == 0.0
        and config.presence_penalty == 0.0
        and not config.logit_bias
        and not config.bad_token_ids
        and not config.bad_words
        and not config.min_new_tokens
        and config.response_format is None
    )


def validate_config(config: GenerationConfig, vocab_size: int) -> None:
    """Raise `ValueError` when `config` names token ids the model can't produce (call it when a request arrives)."""
    for name, ids in (("logit_bias", config.logit_bias or {}), ("bad_token_ids", config.bad_token_ids or [])):
        bad = sorted(t for t in ids if t >= vocab_size)
        if bad:
            raise ValueError(f"GenerationConfig.{name} has token ids {bad} outside the vocabulary of {vocab_size}")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. A host tensor bound for CUDA goes through pinned memory and a copy that does not block:
    a copy from pageable memory waits for the stream, i.e. for every kernel already queued (the step before, with
    overlapped steps), so the host could not run ahead. The pinned block is not reused before the copy has run
    (torch's caching host allocator records it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on `device` (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def start_host_copy(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """CUDA tensors: non-blocking copies into pinned host memory and an event recorded after them (wait on it before
    reading); host tensors come back as they are, with no event."""
    if not tensors[0].is_cuda:
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for destination, source in zip(host, tensors, strict=True):
        destination.copy_(source, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return host_tensor(values, torch.int64, device)


def _rows(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """Row indices, or None when they are empty or the whole batch (then the stage needs no gather)."""
    return _ids(rows, device) if 0 < len(rows) < batch else None


def _scatter_tokens(
    pairs: list[tuple[int, TokenIds]], rows: int, vocab: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[rows, vocab] counts (or presence, for a bool `dtype`) of the tokens in each (row, token id sequence) pair."""
    lists = [(r, ids) for r, ids in pairs if not isinstance(ids, torch.Tensor)]
    # Cached tensors, grouped by device so that each device's are joined there and copied once.
    tensors = sorted(((r, ids) for r, ids in pairs if isinstance(ids, torch.Tensor)), key=lambda x: str(x[1].device))
    lengths = [len(ids) for _, ids in lists] + [ids.numel() for _, ids in tensors]
    # Lists are joined on the host (numpy reads Python ints faster than torch.tensor) and copied once.
    joined = np.fromiter(chain.from_iterable(ids for _, ids in lists), dtype=np.int64, count=sum(lengths[: len(lists)]))
    parts = [to_device(torch.from_numpy(joined), device)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, ids in tensors:
        by_device.setdefault(ids.device, []).append(ids.reshape(-1).to(torch.int64))
    parts += [torch.cat(group).to(device) for group in by_device.values()]
    owners = _ids([r for r, _ in lists] + [r for r, _ in tensors], device)
    row_index = torch.repeat_interleave(owners, _ids(lengths, device), output_size=sum(lengths))  # [total]
    # Ids past the vocabulary land in a spare last column that is cut off: no host sync to filter them out.
    token_index = torch.cat(parts).clamp_(max=vocab)  # [total]
    out = torch.zeros((rows, vocab + 1), dtype=dtype, device=device)
    out.index_put_((row_index, token_index), torch.ones((), dtype=dtype, device=device), accumulate=dtype != torch.bool)
    return out[:, :vocab]


def _ends_with(prompt: TokenIds, output: TokenIds, suffix: list[int]) -> bool:
    """Whether prompt + output ends with `suffix` (False when the sequence is shorter, as in transformers)."""
    n = len(suffix)
    if n == 0:
        return True
    if len(prompt) + len(output) < n:
        return False
    tail = _as_list(output[-n:]) if len(output) >= n else _as_list(prompt[len(prompt) - n + len(output) :])
    if len(output) < n:
        tail += _as_list(output)
    return tail == suffix


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
