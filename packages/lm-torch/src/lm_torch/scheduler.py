"""`Scheduler`: continuous batching with chunked prefill, recompute preemption and fair sharing between requests.
No torch here.

Each step (`schedule`) builds one batch under two limits:
- a token budget, `max_num_batched_tokens` (LMDeploy's max_prefill_token_num): every token computed this step counts,
  a decode's 1 included, so one step's work is bounded whatever the mix of decodes and prefill chunks;
- `max_batch_size`: the number of RUNNING sequences (those holding KV blocks), stepped this time or not.
Running sequences go first, oldest first, each taking min(its uncomputed tokens, budget left): decodes and the next
chunks of unfinished prefills. Then waiting sequences are admitted while budget, batch size and blocks allow; a long
prompt gets a chunk of what budget is left and continues next step.

Fairness. Every sequence belongs to a group: the client request it came from (`Sequence.group`, shared by all the
prompts and samples of one request), or a group of its own. Admission takes the waiting group with the fewest running
sequences first (ties: the group whose oldest waiting sequence arrived first), and within a group arrival order. So
one request of thousands of sequences takes the free slots only while nobody else waits, and a request sent behind
it gets the next free slot. With one sequence per group this is first-come-first-served. When the batch is full
(`max_batch_size`) and a waiting group has at least two fewer running sequences than the largest group, that
group's newest running sequence is preempted (one per step) so the waiting one gets its slot: a group holds more
than its share of the batch only while no other group waits, and a request alone keeps the whole batch.

When a running sequence cannot get its next slots (blocks), a running sequence not yet in the batch (possibly itself)
is preempted: the newest of the group with the most running sequences (with one sequence per group: the newest).
Its blocks are released (full ones stay in the prefix cache) and it goes back to its group's waiting sequences with
nothing computed, to be recomputed over prompt + generated tokens later. Waiting sequences are never admitted in a
step that preempted for blocks. The oldest running sequence is never a victim (it always has a newer candidate, or
is alone), so it progresses every step, and every request finishes: one that cannot fit in the whole cache even
alone is finished with "error" instead of waiting forever.

Prefill-only sequences (embeddings, and generations with `max_new_tokens == 0`) are scheduled like prompts, chunks
included, but never sample: they finish as soon as their last prompt token is computed ("stop" for an embedding,
"length" for a generation). Embeddings and sequences that want prompt logprobs never take blocks from the prefix
cache (the runner needs every token's hidden state, so no token may be skipped), though their full blocks are
offered to it.
A guided sequence finishes with "stop" once its grammar has terminated (accepted a stop token) and with "error" if
its grammar rejected a token.

Tokens in flight. `schedule` advances each scheduled sequence's `num_computed_tokens` past the positions the step
computes and counts the tokens it samples as `num_pending_tokens`, so the engine may schedule and launch the next
step before this one's tokens are back (overlap). A sequence with a pending token is scheduled again at once only
when nothing in its next step's host work reads the token's value (`Sequence.needs_host_tokens`) and the token
cannot be its last; its next step then computes the pending token's position, reading the token from the runner's
device buffer. `update(batch, result)` runs once per step, in launch order, with the real token ids: it is the only
code that appends tokens and decides "stop", "length" or "error". A step may sample several tokens for one
sequence (`num_tokens_per_step` > 1: the runner computes extra positions from its own inputs and returns the
tokens it accepts); `update` appends them one by one, checking the stop rules after each and dropping the tokens
after the one that ends the sequence, and rolls back the positions whose inputs were not accepted.

Invariants (between calls): `running` is sorted by arrival, so is each group's list of waiting sequences; running
sequences hold blocks and waiting ones none; `_num_running[g]` counts the running sequences of group g (absent: 0).
With one sequence per group, every running sequence arrived before every waiting one.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lm_core.engine import FinishReason
from lm_core.generation_config import GenerationConfig
from lm_torch.block_manager import BlockManager
from lm_torch.multimodal import chunk_for, encoder_tokens
from lm_torch.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class NewRequest:
    """What the model runner keeps for a request from its first step until `ScheduledBatch.finished_request_ids`
    names it: sent once, in the batch that first schedules the request."""

    request_id: str
    prompt_token_ids: list[int]
    gen_config: GenerationConfig
    bad_word_ids: list[list[int]] | None = None
    pooling: str | None = None  # an embedding request: "mean" or "last"
    normalize: bool = True
    # A guided request's grammar state: the runner reads it to mask the logits; `Scheduler.update` advances it.
    grammar: Any = None
    # Images and videos (`lm_torch.multimodal.MMItem`): the runner encodes each when a step computes its span.
    mm_items: tuple[Any, ...] = ()


# What `ScheduledBatch.for_workers` leaves in `NewRequest.grammar` of a guided request: the runner knows it is
# guided (never plain greedy) and takes its masks from `ScheduledBatch.guided_bitmask`.
GUIDED_BY_ENGINE = "guided: masks come with each batch"


@dataclass(frozen=True)
class GuidedBitmask:
    """The token masks of a step's guided rows, computed where the grammars live (the engine's process) for a runner
    in another: `rows` index the step's sampled rows (in `ScheduledBatch.sample_rows` order), `bitmask` is
    [len(rows), ceil(vocab / 32)] int32 (xgrammar's layout: bit t % 32 of word t // 32 allows token t)."""

    rows: list[int]
    bitmask: Any  # numpy int32 array


@dataclass
class ScheduledBatch:
    """One step's work: the scheduler's output and the contract with the model runner (through the executor).

    For row i, the runner computes positions `[starts[i], starts[i] + num_new_tokens[i])` of request
    `request_ids[i]`, whose KV goes to the slots of `block_tables[i]` (all allocated already). The input tokens are
    `token_ids[i]` followed by the request's pending tokens, `num_new_tokens[i] - len(token_ids[i])` of them (0 or
    1): tokens a launched step samples, which the runner reads from its own device buffer. The runner then samples
    up to `num_sampled[i]` tokens for row i (0: none, mid-prompt or prefill-only) and returns the ones it accepted;
    one per row today, several once drafts are verified. Positions after the last accepted token are rolled back by
    `Scheduler.update`.

    `new_requests` describes the requests scheduled for the first time; `finished_request_ids` the ones that ended
    since the previous batch, whose runner state can go; `preempted_request_ids` the ones preempted since the
    previous batch (their token-buffer slots can go); `preempted` the sequences this step preempted.
    `seqs` are the scheduler's own objects, for `Scheduler.update`: the runner reads only the fields above.
    `guided_bitmask`: set by an executor whose runner runs in another process (`for_workers`), where grammars
    cannot go; an in-process runner fills the masks from the grammar states of `new_requests`.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_sampled: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    # Row i's blocks as they are when the step is scheduled (the block manager replaces, never clears, the list of
    # a sequence it frees, so an abort while the step runs does not change what the step reads).
    block_tables: list[list[int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    guided_bitmask: GuidedBitmask | None = None

    def __post_init__(self) -> None:
        num = len(self.seqs) or len(self.request_ids)
        if num and not self.starts and not self.token_ids:  # built by hand (tests): from the sequences' state
            self.starts = [s.num_computed_tokens for s in self.seqs]
            self.token_ids = [
                s.token_ids[a : a + n] for s, a, n in zip(self.seqs, self.starts, self.num_new_tokens, strict=True)
            ]
        if num and not self.request_ids:
            self.request_ids = [s.request_id for s in self.seqs]
            self.block_tables = [s.block_table for s in self.seqs]
        for name in ("num_new_tokens", "num_sampled", "starts", "token_ids", "request_ids", "block_tables"):
            if len(getattr(self, name)) != num:
                raise ValueError(f"ScheduledBatch.{name} has {len(getattr(self, name))} entries for {num} seqs")
        if any(n < 1 for n in self.num_new_tokens):
            raise ValueError(f"ScheduledBatch.num_new_tokens must all be >= 1, got {self.num_new_tokens}")
        if any(k < 0 for k in self.num_sampled):
            raise ValueError(f"ScheduledBatch.num_sampled must all be >= 0, got {self.num_sampled}")

    def for_workers(self, vocab_size: int) -> ScheduledBatch:
        """A copy to send to runners in other processes: no `Sequence` objects or grammar states (they stay with
        the scheduler), the guided rows' token masks computed here instead."""
        import dataclasses

        import torch

        sample_rows = self.sample_rows
        guided = [j for j, i in enumerate(sample_rows) if self.seqs[i].grammar is not None]
        bitmask = None
        if guided:
            from lm_torch.guided import fill_bitmasks

            seqs = [self.seqs[sample_rows[j]] for j in guided]
            masks = fill_bitmasks([s.grammar for s in seqs], seqs, vocab_size, torch.device("cpu"))
            bitmask = GuidedBitmask(guided, masks.numpy())
        requests = [
            dataclasses.replace(r, grammar=GUIDED_BY_ENGINE) if r.grammar is not None else r for r in self.new_requests
        ]
        return dataclasses.replace(self, seqs=[], preempted=[], new_requests=requests, guided_bitmask=bitmask)

    @property
    def sample_rows(self) -> list[int]:
        """The rows that sample, in order."""
        return [i for i, k in enumerate(self.num_sampled) if k]

    @property
    def num_tokens(self) -> int:
        """Tokens computed in the step (every row's new positions)."""
        return sum(self.num_new_tokens)

    @property
    def num_decodes(self) -> int:
        """Rows with one new position."""
        return sum(n == 1 for n in self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        """Whether the step has no rows."""
        return not self.request_ids

    def add(self, seq: Sequence, num_new_tokens: int, num_sampled: int | None = None) -> None:
        """Schedule `num_new_tokens` positions of `seq` from its `num_computed_tokens` (not advanced here), sampling
        `num_sampled` tokens (default: one where the step reaches the sequence's last position)."""
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.starts.append(start)
        self.token_ids.append(seq.token_ids[start : start + num_new_tokens])
        self.request_ids.append(seq.request_id)
        self.block_tables.append(seq.block_table)
        # The step reaches the sequence's last position: its logits give the next token (prefill-only sequences
        # sample nothing).
        if num_sampled is None:
            end = seq.num_tokens + seq.num_pending_tokens
            num_sampled = int(not seq.is_prefill_only and start + num_new_tokens == end)
        self.num_sampled.append(num_sampled)


@dataclass
class StepResult:
    """What a step returns for its batch, row by row (the executor's output, a plain value).

    `sampled_token_ids[i]`: the tokens accepted for row i (at most `num_sampled[i]`; empty where it samples nothing).
    `logprobs[i]`: one entry per accepted token, or None. `embeddings[i]`: the pooled vector of an embedding request
    whose prompt the step completed. `prompt_logprobs[i]`: the prompt logprobs the step computed for row i.
    """

    sampled_token_ids: list[list[int]]
    logprobs: list[list[dict[int, float]] | None]
    embeddings: list[list[float] | None] | None = None
    prompt_logprobs: list[Any] | None = None


class Scheduler:
    """Continuous batching over a `BlockManager` (see the module docstring): `add`, `schedule`, `update`, `abort`."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int = 256,
        max_num_batched_tokens: int = 4096,
        session_len: int | None = None,
        prefill_interval: int = 0,
        num_tokens_per_step: int = 1,
        max_encoder_tokens: int | None = None,
    ) -> None:
        """`max_encoder_tokens`: the most image placeholder tokens whose spans one step computes (the vision
        tower's work; None: the token budget bounds it). A chunk stops before the image that would exceed it, except
        the step's first image, which always goes."""
        for name, value in (("max_batch_size", max_batch_size), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler.{name} must be an integer >= 1, got {value!r}")
        if session_len is not None and (
            isinstance(session_len, bool) or not isinstance(session_len, int) or session_len < 1
        ):
            raise ValueError(f"Scheduler.session_len must be an integer >= 1 or None, got {session_len!r}")
        if isinstance(prefill_interval, bool) or not isinstance(prefill_interval, int) or prefill_interval < 0:
            raise ValueError(f"Scheduler.prefill_interval must be an integer >= 0, got {prefill_interval!r}")
        if isinstance(num_tokens_per_step, bool) or not isinstance(num_tokens_per_step, int) or num_tokens_per_step < 1:
            raise ValueError(f"Scheduler.num_tokens_per_step must be an integer >= 1, got {num_tokens_per_step!r}")
        self.prefill_interval = prefill_interval
        # Tokens a decoding sequence may get from one step (> 1: the runner computes extra positions from its own
        # inputs, drafts or samples, and returns the tokens it accepts; `update` rolls back the rest).
        self.num_tokens_per_step = num_tokens_per_step
        self._steps_since_admission = 0
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        if max_encoder_tokens is not None and (
            isinstance(max_encoder_tokens, bool) or not isinstance(max_encoder_tokens, int) or max_encoder_tokens < 1
        ):
            raise ValueError(
                f"Scheduler.max_encoder_tokens must be an integer >= 1 or None, got {max_encoder_tokens!r}"
            )
        self.max_encoder_tokens = max_encoder_tokens
        self.session_len = session_len
        self.running: list[Sequence] = []
        # Per group (see `_group`): its waiting sequences, sorted by arrival, and its number of running ones.
        self._waiting: dict[Hashable, list[Sequence]] = {}
        self._num_waiting = 0
        self._num_running: dict[Hashable, int] = {}
        # Groups with waiting sequences by admission priority: a heap of (running, head arrival, tick, group). An
        # entry goes stale when its group's running count or head changes (a fresh one is pushed then); stale ones
        # are dropped when they reach the top.
        self._queue: list[tuple[int, int, int, Hashable]] = []
        self._tick = itertools.count()
        self.num_preemptions = 0
        self._unfinished: dict[str, Sequence] = {}
        self._rejected: list[Sequence] = []  # finished by add(), until take_finished() hands them out
        # Requests the runner knows that ended since the last non-empty batch (`ScheduledBatch.finished_request_ids`).
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []  # likewise, preempted since the last non-empty batch
        self._next_arrival = 0
        # Tokens the whole cache can hold: a sequence needing more can never be computed, whatever is preempted.
        self._capacity = block_manager.num_blocks * block_manager.block_size

    # ---- requests ------------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence and stamp its `arrival` (FCFS order). One that can never run (prompt >= session_len,
        or more KV than the whole cache) is finished with "error" at once; `take_finished` hands it to the engine."""
        if seq.request_id in self._unfinished:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id!r} is not a fresh waiting sequence")
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        # A generation needs room for at least one new token; an embedding may fill the whole session.
        limit = self.session_len + 1 if seq.is_embedding and self.session_len is not None else self.session_len
        if limit is not None and seq.num_prompt_tokens >= limit:
            seq.finish("error", f"the prompt has {seq.num_prompt_tokens} tokens; session_len is {self.session_len}")
            self._rejected.append(seq)
        elif seq.num_tokens > self._capacity:
            seq.finish("error", self._too_long(seq))
            self._rejected.append(seq)
        else:
            self._unfinished[seq.request_id] = seq
            self._enqueue(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request with "abort" and release its blocks now; None if it is unknown or already finished."""
        seq = self._unfinished.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return seq

    def take_finished(self) -> list[Sequence]:
        """Sequences finished outside a step ("error" at `add`) since the last call; the engine reports them."""
        rejected, self._rejected = self._rejected, []
        return rejected

    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued without blocks."""
        return self._num_waiting

    @property
    def waiting(self) -> list[Sequence]:
        """Every waiting sequence, in arrival order (a copy; O(n log n): for stats and tests)."""
        return sorted(self._iter_waiting(), key=_arrival)

    @property
    def has_unfinished_requests(self) -> bool:
        """True while a step has work to do or `take_finished` has a request to hand out. While a sequence is running or
        waiting, `schedule` never returns an empty batch: it always admits or continues at least one."""
        return bool(self._unfinished or self._rejected)

    def stats(self) -> dict[str, float]:
        """Counts and rates for `EngineStats`."""
        return {
            "num_running": len(self.running),
            "num_waiting": self._num_waiting,
            "kv_usage": self.block_manager.usage(),
            "prefix_cache_hit_rate": self.block_manager.prefix_cache_hit_rate(),
        }

    # ---- one step ------------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """The next step's batch. Advances each scheduled sequence's `num_computed_tokens` past the positions it
        computes and its `num_pending_tokens` by the tokens it samples, so the step after can be scheduled before
        this one's tokens are back (`update` then appends them). A running sequence with a pending token is scheduled
        again only when the host work of its next step does not read that token's value (`needs_host_tokens`) and it
        has exactly one pending: it then computes the position of the pending token."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        encoder_budget = self.max_encoder_tokens
        bm = self.block_manager
        rebalanced = self._rebalance(batch)

        # Running sequences, oldest first. Victims come from those not yet in the batch (index >= i), so a sequence
        # already in the batch keeps its slots.
        i = 0
        short_of_blocks = False
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens < 1 or (seq.num_pending_tokens and not self._may_run_ahead(seq)):
                i += 1  # a launched step computes its last prompt chunk, or it waits for its tokens (`update`)
                continue
            num_new = seq.chunk_size(budget, encoder_budget, encoder_budget == self.max_encoder_tokens)
            if num_new < 1:  # its next image waits for a step with encoder budget left
                i += 1
                continue
            lookahead = self._lookahead(seq, budget - num_new) if num_new == seq.num_uncomputed_tokens == 1 else 0
            if lookahead and not bm.append_slots(seq, num_new + lookahead, lookahead):
                lookahead = 0  # extra positions never cost a preemption
            while not bm.append_slots(seq, num_new + lookahead, lookahead):
                victim = self._victim(i)
                self._preempt(victim)
                batch.preempted.append(victim)
                short_of_blocks = True
                if victim is seq:
                    break
            else:
                batch.add(seq, num_new + lookahead, 1 + lookahead if lookahead else None)
                budget -= num_new + lookahead
                if encoder_budget is not None and seq.mm_items:
                    encoder_budget -= encoder_tokens(seq.mm_items, seq.num_computed_tokens, num_new)
                i += 1

        # Waiting sequences, the fairest group first (see the module docstring); the first that does not fit stops
        # admission (no overtaking).
        admit = rebalanced or not self._defer_admission(batch, budget)
        self._steps_since_admission = 0 if admit or not self._num_waiting else self._steps_since_admission + 1
        while admit and not short_of_blocks and self._num_waiting and budget > 0:
            if len(self.running) >= self.max_batch_size:
                break
            group = self._next_group()
            seq = self._waiting[group][0]
            if seq.num_pending_tokens:
                break  # preempted while a step sampled for it: re-admitted once that token is appended
            cached = [] if seq.skips_prefix_hits else bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if seq.mm_items:
                start = len(cached) * bm.block_size
                first = encoder_budget == self.max_encoder_tokens
                num_new = chunk_for(seq.mm_items, start, num_new, encoder_budget, first)
                if num_new < 1:  # its first image waits for a step with encoder budget left
                    break
                if encoder_budget is not None:
                    encoder_budget -= encoder_tokens(seq.mm_items, start, num_new)
            if not bm.can_allocate(cached, len(cached) * bm.block_size + num_new):
                # With nothing running every block is free or evictable, and add() rejected what the whole cache
                # cannot hold, so this only waits for running sequences to finish or be preempted.
                break
            self._dequeue(seq)
            if not seq.skips_prefix_hits:
                bm.allocate_cached_prefix(seq)
            allocated = bm.append_slots(seq, num_new)
            assert allocated, "can_allocate promised these blocks"
            self._start_running(seq)
            batch.add(seq, num_new)
            budget -= num_new

        for seq, num_new, num_sampled in zip(batch.seqs, batch.num_new_tokens, batch.num_sampled, strict=True):
            seq.num_computed_tokens += num_new
            seq.num_pending_tokens += num_sampled
            if not seq.is_announced:
                seq.is_announced = True
                batch.new_requests.append(
                    NewRequest(
                        seq.request_id,
                        seq.prompt_token_ids,
                        seq.gen_config,
                        seq.bad_word_ids,
                        seq.pooling,
                        seq.normalize,
                        seq.grammar,
                        seq.mm_items,
                    )
                )
        self._preempted_ids += [seq.request_id for seq in batch.preempted]
        if batch.seqs:  # handed to the runner with the next batch it runs
            batch.finished_request_ids, self._finished_ids = self._finished_ids, []
            batch.preempted_request_ids, self._preempted_ids = self._preempted_ids, []
        return batch

    def update(self, batch: ScheduledBatch, result: StepResult) -> list[tuple[int, Sequence, int]]:
        """Record a step's results, in launch order: the one place that appends tokens and decides how a sequence
        ends. Appends each row's accepted tokens one by one, checking stop tokens, the grammar and the limits after
        each (the tokens after the one that ends the sequence are dropped), rolls back positions computed for tokens
        that were not accepted, commits newly full blocks to the prefix cache and releases the blocks of finished
        sequences. A sequence finished before this call (aborted while the step ran) keeps nothing of it.

        Returns (row, sequence, number of tokens it got from this step) for each sequence that got a token or
        finished, in batch order: what the engine streams. A sequence finished with "error" does not get the token
        that caused it."""
        if len(result.sampled_token_ids) != len(batch.seqs):
            raise ValueError(f"{len(result.sampled_token_ids)} rows of sampled tokens for a batch of {len(batch.seqs)}")
        bm = self.block_manager
        outputs: list[tuple[int, Sequence, int]] = []
        for i, seq in enumerate(batch.seqs):
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended while the step ran: its blocks are gone already, drop its tokens
            num_sampled = batch.num_sampled[i]
            tokens = result.sampled_token_ids[i]
            if len(tokens) > num_sampled:
                raise ValueError(
                    f"request {seq.request_id!r} got {len(tokens)} tokens from a step that samples {num_sampled}"
                )
            if num_sampled and not tokens:
                raise ValueError(f"the batch samples request {seq.request_id!r} but no token was given for it")
            seq.num_pending_tokens -= num_sampled
            running = seq.status is SequenceStatus.RUNNING  # else preempted while the step ran
            # Positions whose KV this step wrote validly: those after the last accepted token held inputs that were
            # not accepted, and are computed again.
            rejected = num_sampled - len(tokens)
            computed = batch.starts[i] + batch.num_new_tokens[i] - rejected
            if running and rejected:
                seq.num_computed_tokens -= rejected
            if running and seq.is_prefill_only and computed == seq.num_tokens:
                bm.commit(seq, computed)
                self._finish(seq, "stop" if seq.is_embedding else "length")
                outputs.append((i, seq, 0))
                continue
            emitted = 0
            reason: FinishReason | None = None
            error: str | None = None
            for token_id in tokens:
                seq.append_token(token_id)
                if seq.grammar is not None:
                    # A rejected token sets the grammar's error: the request then ends without emitting it.
                    seq.grammar.accept(token_id)
                reason, error = self._finish_reason(seq)
                if reason != "error":
                    emitted += 1
                if reason is not None:
                    break
            if running:
                bm.commit(seq, computed)
            if reason is not None:
                self._finish(seq, reason, error)
            if emitted or reason is not None:
                outputs.append((i, seq, emitted))
        return outputs

    # ---- internals -----------------------------------------------------------------------------------------------

    def _defer_admission(self, batch: ScheduledBatch, budget: int) -> bool:
        """Whether new prompts wait for a later step. A step that prefills costs more than a decode-only one beyond
        its tokens (on CUDA it runs eagerly: ~30 ms of launches where a decode step replays a graph), so while at
        least half of `max_batch_size` sequences are decoding, and this step has no prefill of its own, new prompts
        gather for up to `prefill_interval` steps or until they fill half the step's token budget, then go in
        together. Below half a batch, or with `prefill_interval` 0, they go in at once (time to first token first)."""
        if not self.prefill_interval or not self._num_waiting or not batch.seqs:
            return False
        if len(self.running) < max(1, self.max_batch_size // 2):
            return False
        if any(n > 1 for n in batch.num_new_tokens):
            return False  # this step prefills anyway
        if self._steps_since_admission + 1 >= self.prefill_interval:
            return False
        waiting_tokens = 0
        for seq in self._iter_waiting():
            waiting_tokens += seq.num_tokens
            if waiting_tokens * 2 >= budget:
                return False
        return True

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Extra positions a decode of `seq` computes this step, sampling one more token for each: up to
        `num_tokens_per_step - 1`, within the budget and what the sequence may still generate."""
        if self.num_tokens_per_step == 1 or seq.is_prefill_only or seq.needs_host_tokens:
            return 0
        left = self.num_tokens_per_step - 1
        num_tokens = seq.num_tokens + seq.num_pending_tokens  # after this step's first token: + 1
        max_new = seq.gen_config.max_new_tokens
        if max_new is not None:
            left = min(left, max_new - (num_tokens + 1 - seq.num_prompt_tokens))
        if self.session_len is not None:
            left = min(left, self.session_len - (num_tokens + 1))
        return max(0, min(left, budget))

    def _may_run_ahead(self, seq: Sequence) -> bool:
        """Whether `seq`, with tokens pending, may be scheduled again before they are appended: exactly one pending,
        nothing in its next step's host work reads its value, and it cannot be the sequence's last token (the limits
        would end it at `update`, and the step would be computed for nothing)."""
        if seq.num_pending_tokens != 1 or seq.needs_host_tokens or seq.num_uncomputed_tokens < 1:
            return False
        num_tokens = seq.num_tokens + 1
        max_new = seq.gen_config.max_new_tokens
        if max_new is not None and num_tokens - seq.num_prompt_tokens >= max_new:
            return False
        return self.session_len is None or num_tokens < self.session_len

    def _finish_reason(self, seq: Sequence) -> tuple[FinishReason | None, str | None]:
        """(finish reason or None, error message) after `seq` got a new token."""
        cfg = seq.gen_config
        grammar = seq.grammar
        if grammar is not None and grammar.error is not None:
            return "error", grammar.error
        # Stop ids cannot end the first min_new_tokens tokens (the sampler masks them there; this checks it too).
        if seq.last_token_id in seq.stop_token_ids and seq.num_generated > cfg.min_new_tokens:
            return "stop", None
        if grammar is not None and grammar.is_terminated:  # the output is complete (stop token accepted)
            return "stop", None
        if cfg.max_new_tokens is not None and seq.num_generated >= cfg.max_new_tokens:
            return "length", None
        if self.session_len is not None and seq.num_tokens >= self.session_len:
            return "length", None
        if seq.num_tokens > self._capacity:  # its next step needs more KV than the whole cache holds
            return "error", self._too_long(seq)
        return None, None

    def _too_long(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (
            f"the sequence needs KV for {seq.num_tokens} tokens but the cache holds only {self._capacity} "
            f"({bm.num_blocks} blocks of {bm.block_size})"
        )

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV (its full blocks stay cached) and queue it ahead of its group's newer
        arrivals."""
        self._stop_running(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _victim(self, start: int) -> Sequence:
        """The running sequence to preempt among `running[start:]`: the newest of the group with the most running
        sequences. Never the oldest of them while another is left (a group of one that is the largest ties with
        every other group, and the newest wins the tie)."""
        num_running = self._num_running
        return max(self.running[start:], key=lambda s: (num_running[_group(s)], s.arrival))

    def _rebalance(self, batch: ScheduledBatch) -> bool:
        """With the batch full and a waiting group at least two running sequences behind the largest group, preempt
        the largest group's newest sequence so that the waiting group gets the slot this step. True if it did."""
        if not self._num_waiting or len(self.running) < self.max_batch_size:
            return False
        behind = self._num_running.get(self._next_group(), 0)
        if max(self._num_running.values()) <= behind + 1:  # O(groups), cheaper than finding the victim
            return False
        victim = self._victim(0)
        self._preempt(victim)
        batch.preempted.append(victim)
        return True

    # ---- groups --------------------------------------------------------------------------------------------------

    def _iter_waiting(self) -> Iterator[Sequence]:
        for seqs in self._waiting.values():
            yield from seqs

    def _push(self, group: Hashable) -> None:
        """Queue `group` at its current priority (if it has waiting sequences); older entries of it go stale."""
        seqs = self._waiting.get(group)
        if seqs:
            entry = (self._num_running.get(group, 0), seqs[0].arrival, next(self._tick), group)
            heapq.heappush(self._queue, entry)
            if len(self._queue) > 64 + 4 * len(self._waiting):  # mostly stale: rebuild from the groups
                self._queue = [
                    (self._num_running.get(g, 0), s[0].arrival, next(self._tick), g) for g, s in self._waiting.items()
                ]
                heapq.heapify(self._queue)

    def _next_group(self) -> Hashable:
        """The waiting group to admit from next: fewest running sequences, then oldest waiting sequence."""
        queue = self._queue
        while True:
            num_running, head, _, group = queue[0]
            seqs = self._waiting.get(group)
            if seqs and seqs[0].arrival == head and self._num_running.get(group, 0) == num_running:
                return group
            heapq.heappop(queue)

    def _enqueue(self, seq: Sequence) -> None:
        group = _group(seq)
        seqs = self._waiting.setdefault(group, [])
        bisect.insort(seqs, seq, key=_arrival)
        self._num_waiting += 1
        if seqs[0] is seq:
            self._push(group)

    def _dequeue(self, seq: Sequence) -> None:
        group = _group(seq)
        seqs = self._waiting[group]
        index = bisect.bisect_left(seqs, seq.arrival, key=_arrival)
        assert seqs[index] is seq, "a waiting sequence is missing from its group"
        del seqs[index]
        self._num_waiting -= 1
        if not seqs:
            del self._waiting[group]
        elif index == 0:
            self._push(group)

    def _start_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_arrival)
        group = _group(seq)
        self._num_running[group] = self._num_running.get(group, 0) + 1
        self._push(group)

    def _stop_running(self, seq: Sequence) -> None:
        """Take `seq` out of `running` (finished, aborted or preempted)."""
        index = bisect.bisect_left(self.running, seq.arrival, key=_arrival)
        assert self.running[index] is seq, "a running sequence is missing from `running`"
        del self.running[index]
        group = _group(seq)
        left = self._num_running[group] - 1
        if left:
            self._num_running[group] = left
        else:
            del self._num_running[group]
        self._push(group)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End `seq` wherever it is (running or waiting): release its blocks, and tell the runner with the next
        batch that its state can go."""
        if seq.status is SequenceStatus.RUNNING:
            self._stop_running(seq)
        elif seq.status is SequenceStatus.WAITING and seq.request_id in self._unfinished:
            self._dequeue(seq)
        self.block_manager.free(seq)
        seq.finish(reason, error)
        del self._unfinished[seq.request_id]
        if seq.is_announced:
            self._finished_ids.append(seq.request_id)


def _group(seq: Sequence) -> Hashable:
    """The fairness group of `seq`: its client request, or the sequence itself when it has none."""
    return seq.group if seq.group is not None else seq


def _arrival(seq: Sequence) -> int:
    return seq.arrival
