"""`Scheduler`: continuous batching with chunked prefill and recompute preemption. No torch here.

Each step (`schedule`) builds one batch under two limits:
- a token budget, `max_num_batched_tokens` (LMDeploy's max_prefill_token_num): every token computed this step counts,
  a decode's 1 included, so one step's work is bounded whatever the mix of decodes and prefill chunks;
- `max_batch_size`: the number of RUNNING sequences (those holding KV blocks), stepped this time or not.
Running sequences go first, oldest first, each taking min(its uncomputed tokens, budget left): decodes and the next
chunks of unfinished prefills. Then waiting sequences are admitted first-come-first-served while budget, batch size
and blocks allow; a long prompt gets a chunk of what budget is left and continues next step.

When a running sequence cannot get its next slots, the most recently arrived running sequence that is not yet in the
batch (possibly itself) is preempted: its blocks are released (full ones stay in the prefix cache) and it goes back to
the front of the waiting queue with nothing computed, to be recomputed over prompt + generated tokens later. Waiting
sequences are never admitted at the cost of a preemption, and not at all in a step that preempted. Since preemption
takes the newest first, the oldest running sequence always progresses, so every request finishes: one that cannot
fit in the whole cache even alone is finished with "error" instead of waiting forever.

Prefill-only sequences (embeddings, and generations with `max_new_tokens == 0`) are scheduled like prompts, chunks
included, but never sample: they finish as soon as their last prompt token is computed ("stop" for an embedding,
"length" for a generation). Embeddings and sequences that want prompt logprobs never take blocks from the prefix
cache (the runner needs every token's hidden state, so no token may be skipped), though their full blocks are
offered to it.
A guided sequence finishes with "stop" once its grammar has terminated (accepted a stop token) and with "error" if
its grammar rejected a token.

Invariants (between calls): `running` is sorted by arrival, so is `waiting`, and every running sequence arrived before
every waiting one; running sequences hold blocks and waiting ones none.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lm_torch.block_manager import BlockManager
from lm_torch.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work, the contract with the model runner.

    For `seqs[i]` the runner computes tokens `[num_computed_tokens, num_computed_tokens + num_new_tokens[i])` (their KV
    goes to slots of `block_table`, all allocated already) and, where `sample[i]`, samples the next token from the
    logits of the last of them.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("num_new_tokens", "sample"):
            if len(getattr(self, name)) != len(self.seqs):
                raise ValueError(
                    f"ScheduledBatch.{name} has {len(getattr(self, name))} entries for {len(self.seqs)} seqs"
                )
        if any(n < 1 for n in self.num_new_tokens):
            raise ValueError(f"ScheduledBatch.num_new_tokens must all be >= 1, got {self.num_new_tokens}")

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        # The step reaches the sequence's last token: its logits give the next token (prefill-only sequences sample
        # nothing).
        self.sample.append(not seq.is_prefill_only and seq.num_computed_tokens + num_new_tokens == seq.num_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int = 256,
        max_num_batched_tokens: int = 4096,
        session_len: int | None = None,
        prefill_interval: int = 0,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler.{name} must be an integer >= 1, got {value!r}")
        if session_len is not None and (
            isinstance(session_len, bool) or not isinstance(session_len, int) or session_len < 1
        ):
            raise ValueError(f"Scheduler.session_len must be an integer >= 1 or None, got {session_len!r}")
        if isinstance(prefill_interval, bool) or not isinstance(prefill_interval, int) or prefill_interval < 0:
            raise ValueError(f"Scheduler.prefill_interval must be an integer >= 0, got {prefill_interval!r}")
        self.prefill_interval = prefill_interval
        self._steps_since_admission = 0
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.session_len = session_len
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._unfinished: dict[str, Sequence] = {}
        self._rejected: list[Sequence] = []  # finished by add(), until take_finished() hands them out
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
            self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request with "abort" and release its blocks now; None if it is unknown or already finished."""
        seq = self._unfinished.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, "abort")
        return seq

    def take_finished(self) -> list[Sequence]:
        """Sequences finished outside a step ("error" at `add`) since the last call; the engine reports them."""
        rejected, self._rejected = self._rejected, []
        return rejected

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished_requests(self) -> bool:
        """True while a step has work to do or `take_finished` has a request to hand out. While a sequence is running or
        waiting, `schedule` never returns an empty batch: it always admits or continues at least one."""
        return bool(self._unfinished or self._rejected)

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_usage": self.block_manager.usage(),
            "prefix_cache_hit_rate": self.block_manager.prefix_cache_hit_rate(),
        }

    # ---- one step ------------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Running sequences, oldest first. Victims come off the end of `running`: all newer than `seq` and not yet in
        # the batch, so a sequence already in the batch keeps its slots.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not bm.append_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.add(seq, num_new)
                budget -= num_new
                i += 1

        # Waiting sequences, first come first served; the first that does not fit stops admission (no overtaking).
        admit = not self._defer_admission(batch, budget)
        self._steps_since_admission = 0 if admit or not self.waiting else self._steps_since_admission + 1
        while admit and not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = [] if seq.skips_prefix_hits else bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_allocate(cached, len(cached) * bm.block_size + num_new):
                # With nothing running every block is free or evictable, and add() rejected what the whole cache
                # cannot hold, so this only waits for running sequences to finish or be preempted.
                break
            self.waiting.popleft()
            if not seq.skips_prefix_hits:
                bm.allocate_cached_prefix(seq)
            allocated = bm.append_slots(seq, num_new)
            assert allocated, "can_allocate promised these blocks"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch

    def update(self, batch: ScheduledBatch, sampled_token_ids: list[int | None]) -> list[Sequence]:
        """Record a step's results: advance `num_computed_tokens`, commit newly full blocks to the prefix cache, append
        the sampled tokens and finish what is done (finished sequences release their blocks). Returns the sequences
        that got a token or finished, in batch order: what the engine streams."""
        if len(sampled_token_ids) != len(batch.seqs):
            raise ValueError(f"{len(sampled_token_ids)} sampled tokens for a batch of {len(batch.seqs)}")
        bm = self.block_manager
        outputs: list[Sequence] = []
        for seq, num_new, sample, token_id in zip(
            batch.seqs, batch.num_new_tokens, batch.sample, sampled_token_ids, strict=True
        ):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran: its blocks are gone already, drop the token
            seq.num_computed_tokens += num_new
            bm.commit(seq)
            if seq.is_prefill_only and seq.num_computed_tokens == seq.num_tokens:
                self.running.remove(seq)
                self._finish(seq, "stop" if seq.is_embedding else "length")
                outputs.append(seq)
                continue
            if not sample:
                continue
            if token_id is None:
                raise ValueError(f"the batch samples request {seq.request_id!r} but no token was given for it")
            seq.append_token(token_id)
            reason, error = self._finish_reason(seq)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason, error)
            outputs.append(seq)
        return outputs

    # ---- internals -----------------------------------------------------------------------------------------------

    def _defer_admission(self, batch: ScheduledBatch, budget: int) -> bool:
        """Whether new prompts wait for a later step. A step that prefills costs more than a decode-only one beyond
        its tokens (on CUDA it runs eagerly: ~30 ms of launches where a decode step replays a graph), so while at
        least half of `max_batch_size` sequences are decoding, and this step has no prefill of its own, new prompts
        gather for up to `prefill_interval` steps or until they fill half the step's token budget, then go in
        together. Below half a batch, or with `prefill_interval` 0, they go in at once (time to first token first)."""
        if not self.prefill_interval or not self.waiting or not batch.seqs:
            return False
        if len(self.running) < max(1, self.max_batch_size // 2):
            return False
        if any(n > 1 for n in batch.num_new_tokens):
            return False  # this step prefills anyway
        if self._steps_since_admission + 1 >= self.prefill_interval:
            return False
        waiting_tokens = 0
        for seq in self.waiting:
            waiting_tokens += seq.num_tokens
            if waiting_tokens * 2 >= budget:
                return False
        return True

    def _finish_reason(self, seq: Sequence) -> tuple[str | None, str | None]:
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
        """Recompute preemption: drop the KV (its full blocks stay cached) and queue it ahead of newer arrivals."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.block_manager.free(seq)
        seq.finish(reason, error)
        del self._unfinished[seq.request_id]
