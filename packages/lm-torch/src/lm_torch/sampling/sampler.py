"""`Sampler`: turns a step's logits into next tokens (and logprobs), vectorised over the batch."""

from __future__ import annotations

import torch

from lm_torch.sampling import ops
from lm_torch.sampling.params import SamplingInputs, host_tensor, start_host_copy, to_device


class SamplerOutput:
    """One step's result: `token_ids` [batch] int64, and per row the asked-for logprobs (None rows: not asked).

    The logprobs are read from the device when first asked for (`logprobs`), not when the step is sampled: on CUDA
    their copies to pinned memory are queued behind the step, so sampling never waits for the GPU, and the engine
    reads them once it has waited for the step's tokens anyway (`pending_logprobs`).
    """

    def __init__(self, token_ids: torch.Tensor, pending_logprobs: PendingLogprobs | None = None) -> None:
        self.token_ids = token_ids
        self.pending_logprobs = pending_logprobs

    @property
    def logprobs(self) -> list[dict[int, float] | None] | None:
        """Per row {token id: logprob} (None rows: not asked); None when no row asked. Waits for the host copy."""
        return None if self.pending_logprobs is None else self.pending_logprobs.resolve()


class Sampler:
    """Picks each row's next token. The logits go through, in this order:

    0. guided rows: -inf on every token their grammar disallows, so that penalties, logprobs and sampling all see
       the constrained distribution;
    1. penalties: repetition (transformers' rule, over prompt + output), then frequency and presence (OpenAI's rule,
       over the output only);
    2. `logit_bias` added;
    3. masks to -inf: `bad_token_ids`, bad words whose prefix ends the sequence, and the stop ids while fewer than
       `min_new_tokens` tokens were generated;
    4. greedy rows take the arg-max here; sampling rows are divided by their temperature. This is the *processed*
       distribution: logprobs are its `log_softmax` (greedy rows: at temperature 1);
    5. truncation of sampling rows, as transformers' warpers chain them: top-k, then top-p on what top-k kept, then
       min-p. Each row gets one threshold logit, so tokens tied with the last one kept all stay (transformers may
       drop some of a tie at the top-p edge);
    6. one token drawn per sampling row by inverting the CDF with a single uniform from the row's own generator
       (shared default generator for unseeded rows), so a seeded row's tokens don't depend on the rest of the batch.

    Logit columns at or past `inputs.vocab_size` (a padded LM head) are never picked.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Draws for unseeded rows; None means torch's default generator of the logits' device.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs) -> SamplerOutput:
        """logits: [batch, vocab] of any float dtype (computed in float32); returns the next token of every row."""
        logits = self.processed_logits(logits, inputs)  # [batch, vocab]
        tokens = torch.empty(inputs.batch_size, dtype=torch.int64, device=logits.device)
        if inputs.any_greedy:
            tokens = logits.argmax(dim=-1)
        logprobs = _LogprobRequest(logits, inputs.logprobs)
        if not inputs.all_greedy:
            threshold = self.thresholds(logits, inputs)  # [batch, 1] or None
            uniforms = self._uniforms(inputs, logits.device)
            rows = inputs.sample_rows  # [sampling rows]
            if rows is not None:
                picked = None if threshold is None else threshold.index_select(0, rows)
                sampled = ops.sample_inverse_cdf(logits.index_select(0, rows), picked, uniforms)
                tokens = tokens.index_copy(0, rows, sampled)
            else:
                tokens = ops.sample_inverse_cdf(logits, threshold, uniforms)
        return SamplerOutput(tokens, logprobs.finish(tokens))

    def processed_logits(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """Steps 0-4 on a float32 copy: the distribution logprobs report. Returns [batch, vocab_size]."""
        if logits.dim() != 2 or logits.shape[0] != inputs.batch_size or logits.shape[1] < inputs.vocab_size:
            shape = tuple(logits.shape)
            raise ValueError(f"logits of shape {shape} don't fit {inputs.batch_size} rows x {inputs.vocab_size}")
        # Every later stage works in place on this copy, of the vocabulary's columns only (a padded LM head has more).
        logits = logits[:, : inputs.vocab_size].to(torch.float32, copy=True)
        if inputs.guided_bitmask is not None:
            ops.apply_token_bitmask(logits, inputs.guided_rows, inputs.guided_bitmask, inputs.vocab_size)
        if inputs.any_penalty:
            ops.apply_penalties(
                logits,
                inputs.penalty_rows,
                inputs.repetition_penalty,
                inputs.seen_mask,
                inputs.frequency_penalty,
                inputs.presence_penalty,
                inputs.output_counts,
            )
        if inputs.bias_index is not None and inputs.bias_values is not None:
            logits.index_put_(inputs.bias_index, inputs.bias_values, accumulate=True)
        if inputs.ban_index is not None:
            logits.index_put_(inputs.ban_index, logits.new_full((), ops.NEG_INF))  # no host copy
        if inputs.temperature is not None:
            logits.div_(inputs.temperature[:, None])
        return logits

    def thresholds(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor | None:
        """Step 5 on processed `logits` [batch, vocab]: per row the smallest logit kept, [batch, 1] (None: keep all)."""
        return ops.truncation_thresholds(
            logits, inputs.truncate_rows, inputs.top_k, inputs.top_p, inputs.min_p, inputs.candidate_width
        )

    def truncate(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """Step 5 in place on processed `logits` [batch, vocab]: what stays finite is the distribution sampled from."""
        return ops.apply_threshold(logits, self.thresholds(logits, inputs))

    def _uniforms(self, inputs: SamplingInputs, device: torch.device) -> torch.Tensor:
        """One uniform in [0, 1) per sampling row, in row order: [sampling rows] float32 on `device`."""
        generators = [g for g, greedy in zip(inputs.generators, inputs.greedy, strict=True) if not greedy]
        seeded = [i for i, g in enumerate(generators) if g is not None]
        shared = [i for i, g in enumerate(generators) if g is None]
        shared_draws = seeded_draws = None
        if shared:
            gen_device = self.generator.device if self.generator is not None else device
            shared_draws = to_device(torch.rand(len(shared), generator=self.generator, device=gen_device), device)
        if seeded:
            # One scalar per seeded row from its own generator: the only per-row loop, and it does no math.
            # CPU generators are cheapest (a few microseconds each, then one copy); CUDA ones launch a kernel each.
            draws = [torch.rand(1, generator=g, device=g.device) for g in generators if g is not None]
            same_device = len({d.device for d in draws}) == 1
            if same_device:
                seeded_draws = to_device(torch.cat(draws), device)
            else:
                seeded_draws = torch.cat([to_device(d, device) for d in draws])
        if seeded_draws is None:
            return shared_draws if shared_draws is not None else torch.empty(0, dtype=torch.float32, device=device)
        if shared_draws is None:
            return seeded_draws
        uniforms = torch.empty(len(generators), dtype=torch.float32, device=device)
        uniforms.index_copy_(0, host_tensor(shared, torch.int64, device), shared_draws)
        uniforms.index_copy_(0, host_tensor(seeded, torch.int64, device), seeded_draws)
        return uniforms


class _LogprobRequest:
    """Top-N logprobs of the processed distribution, taken before truncation changes the logits."""

    def __init__(self, logits: torch.Tensor, asked: list[int | None]) -> None:
        self.asked = asked
        self.rows = [i for i, n in enumerate(asked) if n is not None]
        if not self.rows:
            return
        index = host_tensor(self.rows, torch.int64, logits.device)
        self.index = None if len(self.rows) == len(asked) else index
        source = logits if self.index is None else logits.index_select(0, index)
        self.logprobs = torch.log_softmax(source, dim=-1)  # [rows, vocab]
        width = max(asked[i] or 0 for i in self.rows)
        self.top = self.logprobs.topk(width, dim=-1) if width else None  # ([rows, width], [rows, width])

    def finish(self, tokens: torch.Tensor) -> PendingLogprobs | None:
        """The sampled tokens' logprobs and each row's top N, on their way to the host (None: no row asked)."""
        if not self.rows:
            return None
        chosen = tokens if self.index is None else tokens.index_select(0, self.index)  # [rows]
        chosen_lp = self.logprobs.gather(1, chosen[:, None]).squeeze(1)  # [rows]
        tensors = [chosen, chosen_lp] + ([self.top.indices, self.top.values] if self.top else [])
        return PendingLogprobs(self.asked, self.rows, tensors)


class PendingLogprobs:
    """A step's logprobs on their way to the host: on CUDA copied without blocking into pinned memory, behind the
    step's kernels on the same stream, with an event after them; `resolve()` waits for that event (free once the
    caller has waited for the step's tokens) and builds each row's {token id: logprob}."""

    def __init__(self, asked: list[int | None], rows: list[int], tensors: list[torch.Tensor]) -> None:
        self.asked, self.rows = asked, rows
        tensors, self._event = start_host_copy(tensors)
        self._tensors = tensors  # emptied once resolved
        self._result: list[dict[int, float] | None] | None = None

    def resolve(self) -> list[dict[int, float] | None]:
        """Per row {token id: logprob} of its top-N allowed tokens and its sampled token (at most N + 1 entries)."""
        if self._result is not None:
            return self._result
        if self._event is not None:
            self._event.synchronize()
        # One host conversion per tensor, then plain Python.
        chosen_list, chosen_lp_list, *top = (t.tolist() for t in self._tensors)
        top_ids, top_values = top if top else ([], [])
        result: list[dict[int, float] | None] = [None] * len(self.asked)
        for j, row in enumerate(self.rows):
            n = self.asked[row] or 0
            # Masked tokens (-inf: a grammar or a ban forbids them) are not candidates: a row with fewer than N
            # allowed tokens lists fewer.
            pairs = zip(top_ids[j][:n], top_values[j][:n], strict=True) if top else ()
            entry = {token: value for token, value in pairs if value != ops.NEG_INF}
            entry.setdefault(chosen_list[j], chosen_lp_list[j])
            result[row] = entry
        self._result, self._tensors = result, []
        return result
