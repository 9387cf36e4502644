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
        if seq.status is SequenceStatus.RUNNING:
            self._stop_running(seq)
        else:
            self._dequeue(seq)
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
        return {
            "num_running": len(self.running),
            "num_waiting": self._num_waiting,
            "kv_usage": self.block_manager.usage(),
            "prefix_cache_hit_rate": self.block_manager.prefix_cache_hit_rate(),
        }

    # ---- one step ------------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        rebalanced = self._rebalance(batch)

        # Running sequences, oldest first. Victims come from those not yet in the batch (index >= i), so a sequence
        # already in the batch keeps its slots.
        i = 0
        short_of_blocks = False
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not bm.append_slots(seq, num_new):
                victim = self._victim(i)
                self._preempt(victim)
                batch.preempted.append(victim)
                short_of_blocks = True
                if victim is seq:
                    break
            else:
                batch.add(seq, num_new)
                budget -= num_new
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
            cached = [] if seq.skips_prefix_hits else bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
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
                self._stop_running(seq)
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
                self._stop_running(seq)
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

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.block_manager.free(seq)
        seq.finish(reason, error)
        del self._unfinished[seq.request_id]


def _group(seq: Sequence) -> Hashable:
    """The fairness group of `seq`: its client request, or the sequence itself when it has none."""
    return seq.group if seq.group is not None else seq


def _arrival(seq: Sequence) -> int:
    return seq.arrival
