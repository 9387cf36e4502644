"""The runner's per-request state (`RequestStates`), driven by the real scheduler: states live from a request's first
step until the scheduler's output names it finished, and the token-buffer slots of the requests that read a pending
token are never shared and never run out, through preemptions, aborts and overlapped steps."""

from __future__ import annotations

import random
from collections import deque

import pytest

from lm_core.generation_config import GenerationConfig
from lm_torch.block_manager import BlockManager
from lm_torch.runner.state import RequestStates
from lm_torch.scheduler import Scheduler, StepResult
from lm_torch.sequence import Sequence


@pytest.mark.parametrize("seed", range(4))
def test_slots_follow_the_running_requests(seed):
    rng = random.Random(seed)
    max_batch = 6
    sched = Scheduler(BlockManager(24, 4), max_batch_size=max_batch, max_num_batched_tokens=32)
    states = RequestStates(max_batch)
    seqs = []
    for i in range(30):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 20))]
        cfg = GenerationConfig(max_new_tokens=rng.randint(1, 30), random_seed=i if i % 3 == 0 else None)
        seqs.append(Sequence(f"r{i}", prompt, len(prompt), cfg))
    arrivals = {rng.randint(0, 40): [] for _ in range(30)}
    for seq in seqs:
        arrivals.setdefault(rng.choice(list(arrivals)), []).append(seq)
    in_flight: deque = deque()
    last_token: dict[str, int] = {}  # what the device buffer holds per slot, as the runner's sampler writes it
    buffer: dict[int, str] = {}
    step = pending_reads = 0
    while step < 5000 and (step <= max(arrivals) or sched.has_unfinished_requests or in_flight):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        if step % 7 == 3 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
        batch = sched.schedule()
        if batch.seqs:
            rows = states.apply(batch)
            slots = [s.slot for s, k in zip(rows, batch.num_sampled, strict=True) if k]
            assert len(set(slots)) == len(slots) and all(0 <= slot < max_batch for slot in slots)
            for i, (state, k) in enumerate(zip(rows, batch.num_sampled, strict=True)):
                assert state.request_id == batch.request_ids[i]
                if len(batch.token_ids[i]) < batch.num_new_tokens[i]:  # reads its pending token from its slot
                    assert buffer[state.slot] == state.request_id
                    pending_reads += 1
                if k:
                    buffer[state.slot] = state.request_id
                    last_token[state.request_id] = rng.randrange(50)
            result = StepResult(
                [[last_token[r]] if k else [] for r, k in zip(batch.request_ids, batch.num_sampled, strict=True)],
                [None] * len(rows),
            )
            in_flight.append((batch, result))
        if len(in_flight) == 2 or (in_flight and not batch.seqs):
            sched.update(*in_flight.popleft())
        step += 1
    assert not sched.has_unfinished_requests
    assert sched.num_preemptions > 0 and pending_reads > 0
    sched.schedule()  # nothing left: no batch, the finished ids wait for one
    assert all(seq.is_finished for seq in seqs)
    # Every state still held belongs to a request whose end the runner has not been told of yet.
    assert len(states) <= max_batch
