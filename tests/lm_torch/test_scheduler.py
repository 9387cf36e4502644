"""Scheduler: token budget, chunked prefill, preemption by recompute, prefix hits, finishing rules and invariants.

A fake model keeps a simulated paged KV cache: the KV of position p mixes the token at p with the KV of p - 1, which it
reads back through the block table. So a block shared wrongly, overwritten, or matched from the prefix cache with the
wrong content changes the sampled tokens, and every request must produce exactly what it produces when run alone.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_core.generation_config import GenerationConfig
from lm_torch.block_manager import BlockManager
from lm_torch.scheduler import ScheduledBatch, Scheduler, StepResult
from lm_torch.sequence import Sequence, SequenceStatus

VOCAB = 32
_MOD = 2**61 - 1


def mix(kv: int, token: int) -> int:
    return (kv * 1_000_003 + token + 1) % _MOD


def sample(kv: int, num_generated: int, stop_ids: frozenset[int], min_new: int) -> int:
    """Deterministic 'sampling' from the last KV; stop ids are masked before min_new_tokens, like the real sampler."""
    token = kv % VOCAB
    while token in stop_ids and num_generated < min_new:
        token = (token + 1) % VOCAB
    return token


class FakeModel:
    """A stand-in for the model runner that reads only the batch (a plain value) and its own state, as the real one
    does: the last token it sampled for each request is its "token buffer", read for a pending input token.
    `accept(seq, k)` decides how many of a row's k sampled tokens it returns (default: all)."""

    def __init__(self, bm: BlockManager, accept=None) -> None:
        self.bm = bm
        self.kv: dict[tuple[int, int], int] = {}
        self.last: dict[str, int] = {}
        self.accept = accept

    def run(self, batch: ScheduledBatch) -> StepResult:
        bs, out = self.bm.block_size, []
        for i, seq in enumerate(batch.seqs):
            start, num_new, num_sampled = batch.starts[i], batch.num_new_tokens[i], batch.num_sampled[i]
            table = batch.block_tables[i]
            inputs = list(batch.token_ids[i])
            if len(inputs) < num_new - max(num_sampled - 1, 0):
                inputs.append(self.last[seq.request_id])  # the pending token
            assert len(table) * bs >= start + num_new, "slots missing"
            kv = self.kv[table[(start - 1) // bs], (start - 1) % bs] if start else 0
            cfg = seq.gen_config
            sampled = []
            for pos in range(start, start + num_new):
                block = table[pos // bs]
                assert self.bm.ref_count(block) == 1 and not self.bm.is_cached(block), "writing a shared block"
                # Past the given inputs a multi-token step feeds its own samples.
                token = inputs[pos - start] if pos - start < len(inputs) else sampled[-1]
                kv = mix(kv, token)
                self.kv[block, pos % bs] = kv
                if pos - start >= num_new - num_sampled:  # a sampled position: the next token
                    generated = pos + 1 - seq.num_prompt_tokens
                    sampled.append(sample(kv, generated, seq.stop_token_ids, cfg.min_new_tokens))
            if sampled:
                keep = self.accept(seq, len(sampled)) if self.accept is not None else len(sampled)
                sampled = sampled[:keep]
                self.last[seq.request_id] = sampled[-1]
            out.append(sampled)
        return StepResult(out, [None] * len(out))


def reference(prompt, cfg: GenerationConfig, capacity: int, session_len: int | None) -> tuple[list[int], str]:
    """What a request generates alone with unlimited budget, and why it stops (the rules the scheduler implements)."""
    if (session_len is not None and len(prompt) >= session_len) or len(prompt) > capacity:
        return [], "error"
    kv, tokens, stops = 0, list(prompt), frozenset(cfg.stop_token_ids or ())
    for t in tokens:
        kv = mix(kv, t)
    while True:
        generated = len(tokens) - len(prompt)
        token = sample(kv, generated, stops, cfg.min_new_tokens)
        tokens.append(token)
        generated += 1
        if token in stops and generated > cfg.min_new_tokens:
            return tokens[len(prompt) :], "stop"
        if (cfg.max_new_tokens is not None and generated >= cfg.max_new_tokens) or (
            session_len is not None and len(tokens) >= session_len
        ):
            return tokens[len(prompt) :], "length"
        if len(tokens) > capacity:
            return tokens[len(prompt) :], "error"
        kv = mix(kv, token)


def check_invariants(sched: Scheduler, batch: ScheduledBatch | None = None, in_flight: bool = False) -> None:
    bm = sched.block_manager
    bm.check_invariants(sched.running)
    arrivals = [s.arrival for s in sched.running], [s.arrival for s in sched.waiting]
    assert arrivals[0] == sorted(arrivals[0]) and len(sched.waiting) == sched.num_waiting
    if all(s.group is None for s in [*sched.running, *sched.waiting]):  # one sequence per group: FCFS
        assert not (arrivals[0] and arrivals[1]) or arrivals[0][-1] < arrivals[1][0]
    # Within a group, arrival order: no waiting sequence arrived before a running one of its group, unless it was
    # preempted (it then goes back ahead of its group's newer arrivals).
    for seq in sched.waiting:
        if seq.num_preemptions == 0 and seq.group is not None:
            assert not any(r.group == seq.group and r.arrival > seq.arrival for r in sched.running)
    groups = Counter(s.group if s.group is not None else s.request_id for s in sched.running)
    assert {g: n for g, n in groups.items()} == {
        (g if isinstance(g, str) else g.request_id): n for g, n in sched._num_running.items()
    }
    assert len(sched.running) <= sched.max_batch_size
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
    assert all(s.num_uncomputed_tokens >= 1 or s.is_prefill_only for s in sched.running)
    assert all(t >= 0 for s in [*sched.running, *sched.waiting] for t in s.token_ids)
    assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in sched.waiting)
    if batch is not None:
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        assert in_flight or batch.seqs or not (sched.running or sched.waiting), "no progress: deadlock"


def run_all(
    sched: Scheduler, arrivals: dict[int, list[Sequence]], aborts=None, max_steps=50_000, model=None, depth: int = 1
):
    """Drive the scheduler like the engine does, checking invariants at every step; returns the number of steps.
    `depth` 2: the next step is scheduled before the previous one is updated (overlap)."""
    model, aborts, step = model or FakeModel(sched.block_manager), aborts or {}, 0
    last_arrival = max(arrivals, default=0)
    in_flight: deque = deque()
    while step <= last_arrival or sched.has_unfinished_requests or in_flight:
        for seq in arrivals.get(step, []):
            sched.add(seq)
        for request_id in aborts.get(step, []):
            sched.abort(request_id)
        sched.take_finished()
        batch = sched.schedule() if sched.has_unfinished_requests else ScheduledBatch()
        check_invariants(sched, batch, in_flight=bool(in_flight))
        if batch.seqs:
            # A launched step computes now (its result is only applied later): what a device queue does.
            in_flight.append((batch, model.run(batch)))
        if len(in_flight) >= depth or (in_flight and not batch.seqs):
            done, result = in_flight.popleft()
            for _, seq, _ in sched.update(done, result):
                assert all(t >= 0 for t in seq.token_ids), "a made-up token id entered a sequence"
            check_invariants(sched)
        step += 1
        assert step < max_steps, "the scheduler does not finish"
    assert sched.block_manager.usage() == 0.0
    return step


def make_seq(request_id, prompt, group=None, **cfg) -> Sequence:
    return Sequence(request_id, list(prompt), len(prompt), GenerationConfig(**cfg), group=group)


def test_no_torch_import():
    code = (
        "import sys, lm_torch.scheduler, lm_torch.block_manager, lm_torch.prefix_cache; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens"),
        ({"session_len": 0}, "session_len"),
        ({"prefill_interval": -1}, "prefill_interval"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"Scheduler\.{field}"):
        Scheduler(BlockManager(4, 4), **kwargs)
    with pytest.raises(ValueError, match=r"ScheduledBatch\.num_sampled"):
        ScheduledBatch([make_seq("r", [1])], [1], [])


def test_decodes_first_then_chunked_prefill_within_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8)
    model = FakeModel(sched.block_manager)
    sched.add(short := make_seq("short", [1, 2, 3], max_new_tokens=10))
    batch = sched.schedule()
    assert batch.seqs == [short] and batch.num_new_tokens == [3] and batch.num_sampled == [True]
    sched.update(batch, model.run(batch))
    sched.add(long := make_seq("long", range(20), max_new_tokens=10))
    chunks = []
    while long.num_generated == 0:
        batch = sched.schedule()
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1  # the decode goes first, costs 1 token
        assert batch.num_tokens <= 8
        chunks.append((batch.num_new_tokens[1], batch.num_sampled[1]))
        sched.update(batch, model.run(batch))
    assert chunks == [(7, False), (7, False), (6, True)]


def _decoding(sched: Scheduler, model: FakeModel, n: int) -> list[Sequence]:
    seqs = [make_seq(f"d{i}", [i, 1, 2], max_new_tokens=100) for i in range(n)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    sched.update(batch, model.run(batch))
    return seqs


def test_prefill_interval_gathers_new_prompts_while_the_batch_is_full():
    sched = Scheduler(BlockManager(256, 4), max_batch_size=8, max_num_batched_tokens=64, prefill_interval=4)
    model = FakeModel(sched.block_manager)
    running = _decoding(sched, model, 4)  # half of max_batch_size decoding
    sched.add(new := make_seq("new", [5, 6, 7], max_new_tokens=2))
    steps = 0
    while new.status is SequenceStatus.WAITING:
        batch = sched.schedule()
        assert batch.seqs[:4] == running and all(n == 1 for n in batch.num_new_tokens[:4])
        sched.update(batch, model.run(batch))
        steps += 1
    assert steps == 4  # waited 3 decode-only steps, admitted with the 4th
    # Prompts that fill half the token budget go in at once.
    sched.add(big := make_seq("big", list(range(40)), max_new_tokens=2))
    batch = sched.schedule()
    assert big in batch.seqs
    sched.update(batch, model.run(batch))


def test_prefill_interval_admits_at_once_below_half_a_batch_or_when_off():
    for running, interval in ((3, 4), (4, 0)):
        sched = Scheduler(BlockManager(256, 4), max_batch_size=8, max_num_batched_tokens=64, prefill_interval=interval)
        model = FakeModel(sched.block_manager)
        _decoding(sched, model, running)
        sched.add(new := make_seq("new", [5, 6, 7], max_new_tokens=2))
        assert new in sched.schedule().seqs


def test_max_batch_size_counts_running_sequences():
    sched = Scheduler(BlockManager(64, 4), max_batch_size=2)
    for i in range(3):
        sched.add(make_seq(f"r{i}", [i, 1, 2], max_new_tokens=2))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"] and sched.num_waiting == 1
    assert sched.stats()["num_running"] == 2 and sched.stats()["num_waiting"] == 1


def test_stop_tokens_min_new_tokens_and_length():
    # The fake model's tokens for this prompt, alone: pick stop ids among them.
    prompt = [3, 1, 4, 1, 5]
    free, _ = reference(prompt, GenerationConfig(max_new_tokens=6), 10**6, None)
    cases = [
        (GenerationConfig(max_new_tokens=6), "length", 6),
        (GenerationConfig(max_new_tokens=6, stop_token_ids=[free[2]]), "stop", free.index(free[2]) + 1),
        (GenerationConfig(max_new_tokens=20, stop_token_ids=[free[0]], min_new_tokens=3), None, None),
    ]
    for i, (cfg, reason, length) in enumerate(cases):
        sched = Scheduler(BlockManager(64, 4))
        seq = Sequence(f"r{i}", prompt, len(prompt), cfg)
        run_all(sched, {0: [seq]})
        expected = reference(prompt, cfg, 10**6, None)
        assert (seq.generated_token_ids, seq.finish_reason) == expected
        if reason is not None:
            assert (seq.finish_reason, seq.num_generated) == (reason, length)
        else:  # the stop id may not end the first 3 tokens
            assert free[0] not in seq.generated_token_ids[:3]


def test_session_len_and_too_long_prompts_finish_with_error_or_length():
    sched = Scheduler(BlockManager(4, 4), session_len=10)
    too_long = make_seq("a", range(10))
    sched.add(too_long)
    assert too_long.finish_reason == "error" and "session_len" in too_long.error
    assert sched.has_unfinished_requests and sched.take_finished() == [too_long] and not sched.has_unfinished_requests
    ok = make_seq("b", range(7), max_new_tokens=100)
    run_all(sched, {0: [ok]})
    assert ok.finish_reason == "length" and ok.num_tokens == 10
    # No session_len: a prompt larger than the whole cache can never run; one that outgrows it stops with "error".
    sched = Scheduler(BlockManager(4, 4))
    huge, grows = make_seq("c", range(17)), make_seq("d", range(14), max_new_tokens=None)
    run_all(sched, {0: [huge, grows]})
    assert huge.finish_reason == "error" and huge.num_generated == 0
    assert grows.finish_reason == "error" and grows.num_tokens == 17 and "holds only 16" in grows.error


def test_abort_frees_blocks_at_once():
    sched = Scheduler(BlockManager(16, 4, enable_prefix_caching=False))
    model = FakeModel(sched.block_manager)
    sched.add(a := make_seq("a", range(10), max_new_tokens=50))
    sched.add(b := make_seq("b", range(5), max_new_tokens=50))
    batch = sched.schedule()
    sched.update(batch, model.run(batch))
    assert sched.block_manager.num_used_blocks == 5
    assert sched.abort("a") is a and a.finish_reason == "abort" and a.block_table == []
    assert sched.block_manager.num_used_blocks == 2 and sched.abort("a") is None and sched.abort("nope") is None
    sched.add(c := make_seq("c", [1], max_new_tokens=50))
    assert sched.abort("c") is c and sched.num_waiting == 0
    # Aborted while its step runs: update drops its token.
    batch = sched.schedule()
    sampled = model.run(batch)
    sched.abort("b")
    assert sched.update(batch, sampled) == [] and b.num_generated == 1
    assert not sched.has_unfinished_requests and sched.block_manager.usage() == 0.0


@pytest.mark.parametrize("block_size", [16, 64])
def test_shared_512_token_prefix_is_reused_while_running_and_after_finishing(block_size):
    shared = [(7 * i) % 1000 for i in range(512)]
    sched = Scheduler(BlockManager(256, block_size), max_num_batched_tokens=4096)
    model = FakeModel(sched.block_manager)

    def step():
        batch = sched.schedule()
        sched.update(batch, model.run(batch))

    sched.add(first := make_seq("first", [*shared, 1, 2, 3], max_new_tokens=8))
    step()
    assert first.status is SequenceStatus.RUNNING and first.num_cached_tokens == 0
    sched.add(second := make_seq("second", shared, max_new_tokens=4))  # exactly the prefix: its last block is computed
    step()
    assert second.num_cached_tokens >= 448 and second.num_cached_tokens == 512 - block_size
    while sched.has_unfinished_requests:
        step()
    sched.add(third := make_seq("third", [*shared, 9, 9], max_new_tokens=4))
    step()
    assert third.num_cached_tokens == 512
    while sched.has_unfinished_requests:
        step()
    rate = sched.stats()["prefix_cache_hit_rate"]
    assert rate == pytest.approx((512 - block_size + 512) / (515 + 512 + 514))
    for seq in (first, second, third):  # and the reused KV gives the same tokens
        assert seq.generated_token_ids == reference(seq.prompt_token_ids, seq.gen_config, 10**6, None)[0]


def test_32_concurrent_requests_with_a_few_blocks_all_finish():
    sched = Scheduler(BlockManager(num_blocks=6, block_size=16), max_batch_size=32, max_num_batched_tokens=64)
    seqs = [make_seq(f"r{i}", [i % 5, *range(20 + i % 13)], max_new_tokens=24) for i in range(32)]
    run_all(sched, {0: seqs})
    assert sched.num_preemptions > 0
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.generated_token_ids == reference(seq.prompt_token_ids, seq.gen_config, 96, None)[0]


def test_prefix_caching_on_and_off_give_identical_outputs():
    outputs = []
    for caching in (True, False):
        sched = Scheduler(BlockManager(12, 4, enable_prefix_caching=caching), max_num_batched_tokens=16)
        seqs = [make_seq(f"r{i}", [*range(18), i % 3], max_new_tokens=6) for i in range(8)]
        run_all(sched, {i: [s] for i, s in enumerate(seqs)})
        outputs.append([s.generated_token_ids for s in seqs])
        assert (sched.block_manager.prefix_cache_hit_rate() > 0) == caching
        assert caching or sched.block_manager.num_free_blocks == 12
    assert outputs[0] == outputs[1]


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    # A cache of 16 to 192 token slots: tight enough to preempt often, and sometimes too small for a request.
    num_blocks = draw(st.integers(max(1, 16 // block_size), 192 // block_size))
    tokens = st.integers(0, VOCAB - 1)
    prefixes = [draw(st.lists(tokens, max_size=40)) for _ in range(2)]
    requests = []
    for i in range(draw(st.integers(1, 12))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(tokens, min_size=1, max_size=12))
        max_new = draw(st.integers(0, 20)) or None  # rarely unlimited: then it runs into session_len or the cache
        cfg = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=draw(st.integers(0, min(3, max_new or 3))),
            stop_token_ids=draw(st.lists(tokens, max_size=2)),
        )
        group = draw(st.sampled_from([None, None, "ga", "gb"]))  # client requests of several sequences, or none
        requests.append((f"r{i}", prompt, cfg, draw(st.integers(0, 15)), draw(st.none() | st.integers(0, 40)), group))
    return {
        "block_manager": BlockManager(num_blocks, block_size, enable_prefix_caching=draw(st.booleans())),
        "max_batch_size": draw(st.integers(1, 8)),
        "max_num_batched_tokens": draw(st.integers(1, 64)),
        "session_len": draw(st.none() | st.integers(8, 100)),
        "prefill_interval": draw(st.sampled_from([0, 0, 2, 5])),
        "requests": requests,
        # Overlap: the next step scheduled before the previous one's tokens are back.
        "depth": draw(st.sampled_from([1, 2])),
        # Multi-token steps, of which the model accepts a random number of tokens (a prefix).
        "num_tokens_per_step": draw(st.sampled_from([1, 1, 2, 4])),
        "accept_seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_with_the_outputs_of_running_alone(w):
    bm = w["block_manager"]
    sched = Scheduler(
        bm,
        w["max_batch_size"],
        w["max_num_batched_tokens"],
        w["session_len"],
        prefill_interval=w["prefill_interval"],
        num_tokens_per_step=w["num_tokens_per_step"],
    )
    rng = random.Random(w["accept_seed"])
    model = FakeModel(bm, accept=lambda seq, k: rng.randint(1, k))
    arrivals, aborts, seqs = {}, {}, []
    for request_id, prompt, cfg, arrival, abort, group in w["requests"]:
        seqs.append(Sequence(request_id, prompt, len(prompt), cfg, group=group))
        arrivals.setdefault(arrival, []).append(seqs[-1])
        if abort is not None:
            aborts.setdefault(arrival + abort, []).append(request_id)
    run_all(sched, arrivals, aborts, model=model, depth=w["depth"])
    capacity = bm.num_blocks * bm.block_size
    for seq in seqs:
        generated, reason = reference(seq.prompt_token_ids, seq.gen_config, capacity, w["session_len"])
        assert seq.is_finished and seq.block_table == []
        if seq.finish_reason == "abort":
            assert generated[: seq.num_generated] == seq.generated_token_ids
        else:
            assert (seq.generated_token_ids, seq.finish_reason) == (generated, reason)
    if not bm.enable_prefix_caching:
        assert bm.num_cached_blocks == 0 and bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("seed", range(6))
def test_heavy_pressure_with_shared_prefixes_and_aborts(seed):
    """Many requests over shared prefixes in a cache of a few blocks: constant preemption, hits on preempted blocks."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    bm = BlockManager(64 // block_size, block_size, enable_prefix_caching=seed % 3 != 0)
    sched = Scheduler(bm, max_batch_size=rng.randint(4, 16), max_num_batched_tokens=rng.randint(8, 48))
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 30))] for _ in range(3)]
    arrivals, aborts, seqs = {}, {}, []
    for i in range(40):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]
        cfg = GenerationConfig(max_new_tokens=rng.randint(1, 24), stop_token_ids=[rng.randrange(VOCAB)])
        group = rng.choice([None, "g0", "g1", "g2"]) if seed % 2 else None
        seqs.append(Sequence(f"r{i}", prompt, len(prompt), cfg, group=group))
        arrivals.setdefault(rng.randint(0, 30), []).append(seqs[-1])
        if rng.random() < 0.1:
            aborts.setdefault(rng.randint(0, 60), []).append(f"r{i}")
    run_all(sched, arrivals, aborts)
    assert sched.num_preemptions > 0
    for seq in seqs:
        generated, reason = reference(seq.prompt_token_ids, seq.gen_config, 64, None)
        if seq.finish_reason == "abort":
            assert generated[: seq.num_generated] == seq.generated_token_ids
        else:
            assert (seq.generated_token_ids, seq.finish_reason) == (generated, reason)


def test_update_rejects_missing_tokens():
    sched = Scheduler(BlockManager(8, 4))
    sched.add(make_seq("a", [1, 2]))
    batch = sched.schedule()
    with pytest.raises(ValueError, match="no token"):
        sched.update(batch, StepResult([[]], [None]))
    with pytest.raises(ValueError, match="rows of sampled tokens"):
        sched.update(batch, StepResult([], []))


def test_engine_style_sequence_from_request():
    from lm_core.engine import EngineRequest

    request = EngineRequest("x", [1, 2, 3], GenerationConfig(max_new_tokens=2))
    seq = Sequence.from_request(request)
    assert seq.token_ids == [1, 2, 3] and seq.token_ids is not request.prompt_token_ids
    sched = Scheduler(BlockManager(8, 4))
    run_all(sched, {0: [seq]})
    assert seq.num_generated == 2 and seq.finish_reason == "length"


# ---- fairness between client requests (groups) ------------------------------------------------------------------


def _step(sched: Scheduler, model: FakeModel) -> ScheduledBatch:
    batch = sched.schedule()
    check_invariants(sched, batch)
    sched.update(batch, model.run(batch))
    check_invariants(sched)
    return batch


def _flood(n: int, group: str = "flood", max_new_tokens: int = 40) -> list[Sequence]:
    return [make_seq(f"{group}{i}", [i % 7, 1, 2, 3], group=group, max_new_tokens=max_new_tokens) for i in range(n)]


def test_a_small_request_behind_a_flood_runs_at_once_and_the_flood_still_finishes():
    sched = Scheduler(BlockManager(512, 4), max_batch_size=4, max_num_batched_tokens=64)
    model = FakeModel(sched.block_manager)
    flood = _flood(40)
    for seq in flood:
        sched.add(seq)
    for _ in range(3):
        _step(sched, model)
    assert sched.num_running == 4 and sched.num_waiting == 36
    sched.add(small := make_seq("small", [9, 9, 9], group="small", max_new_tokens=4))
    steps = 0
    while not small.is_finished:
        batch = _step(sched, model)
        assert small in batch.seqs  # admitted with the next step and stepped every step: its latency when alone
        steps += 1
    assert steps == 4 and sched.num_preemptions == 1  # one flood sequence gave its slot back
    run_all(sched, {}, model=model)
    for seq in [*flood, small]:
        assert seq.generated_token_ids == reference(seq.prompt_token_ids, seq.gen_config, 10**6, None)[0]


def test_fair_admission_gives_a_waiting_request_the_next_free_slot_without_preempting():
    # A full batch of short flood sequences (no group two behind another): no preemption, the next free slot.
    sched = Scheduler(BlockManager(512, 4), max_batch_size=4, max_num_batched_tokens=64)
    model = FakeModel(sched.block_manager)
    for seq in _flood(30, max_new_tokens=3):
        sched.add(seq)
    sched.add(other := make_seq("o0", [5, 5], group="other", max_new_tokens=3))
    _step(sched, model)
    # The other request came after 30 flood sequences; FCFS would admit it last, after ~22 steps.
    while other.status is SequenceStatus.WAITING:
        _step(sched, model)
    assert other.status is SequenceStatus.RUNNING or other.is_finished
    assert sum(s.is_finished for s in sched._unfinished.values()) == 0
    assert sched.num_waiting >= 20 and sched.num_preemptions == 0


def test_two_floods_share_the_batch_equally():
    sched = Scheduler(BlockManager(1024, 4), max_batch_size=8, max_num_batched_tokens=256)
    model = FakeModel(sched.block_manager)
    for seq in _flood(30, "a"):
        sched.add(seq)
    _step(sched, model)
    for seq in _flood(30, "b"):
        sched.add(seq)
    shares = []
    for _ in range(80):
        batch = _step(sched, model)
        shares.append(Counter(s.group for s in batch.seqs))
    # After a few steps of rebalancing (one preemption each), both have half of every step while both wait.
    assert [(c["a"], c["b"]) for c in shares[:4]] == [(7, 1), (6, 2), (5, 3), (4, 4)]
    assert all(c["a"] == c["b"] == 4 for c in shares[4:])
    assert sched.num_preemptions == 4
    run_all(sched, {}, model=model)


def test_a_request_alone_keeps_the_whole_batch():
    sched = Scheduler(BlockManager(1024, 4), max_batch_size=8, max_num_batched_tokens=256)
    flood = _flood(30, max_new_tokens=5)
    model = FakeModel(sched.block_manager)
    for seq in flood:
        sched.add(seq)
    while sched.num_waiting >= 8:
        assert len(_step(sched, model).seqs) == 8
    run_all(sched, {}, model=model)
    assert sched.num_preemptions == 0


def test_short_of_blocks_the_largest_group_gives_way_not_the_newest_request():
    # 12 blocks of 4: three flood sequences and a small request fill them, then decoding needs more.
    sched = Scheduler(BlockManager(12, 4, enable_prefix_caching=False), max_batch_size=8, max_num_batched_tokens=64)
    model = FakeModel(sched.block_manager)
    flood = [make_seq(f"f{i}", [i, 1, 2, 3, 4, 5, 6, 7, 8], group="flood", max_new_tokens=20) for i in range(3)]
    for seq in flood:
        sched.add(seq)
    _step(sched, model)
    sched.add(small := make_seq("small", [9, 8, 7, 6, 5, 4, 3, 2], group="small", max_new_tokens=12))
    while not small.is_finished:
        batch = _step(sched, model)
        assert small not in batch.preempted
    assert sched.num_preemptions > 0 and small.num_preemptions == 0
    run_all(sched, {}, model=model)
    for seq in [*flood, small]:
        assert seq.generated_token_ids == reference(seq.prompt_token_ids, seq.gen_config, 48, None)[0]


def test_group_queue_stays_small_and_correct_under_many_aborts():
    sched = Scheduler(BlockManager(256, 4), max_batch_size=2, max_num_batched_tokens=32)
    model = FakeModel(sched.block_manager)
    seqs = [make_seq(f"r{i}", [i % 5, 1], group=f"g{i % 50}", max_new_tokens=2) for i in range(500)]
    for seq in seqs:
        sched.add(seq)
    for seq in seqs[::3]:
        sched.abort(seq.request_id)
    assert len(sched._queue) <= 64 + 4 * len(sched._waiting)
    run_all(sched, {}, model=model)
    assert all(s.finish_reason in ("abort", "length") for s in seqs)


def test_prompt_logprob_and_prefill_only_sequences():
    """A sequence that wants prompt logprobs computes every position though its prefix is cached (and still offers
    its blocks to the cache); one with max_new_tokens=0 is computed in chunks, never sampled, and ends "length"."""
    prompt = [(5 * i) % 1000 for i in range(64)]
    sched = Scheduler(BlockManager(32, 16), max_num_batched_tokens=24)
    scoring = make_seq("scoring", [*prompt, 7], max_new_tokens=2, prompt_logprobs=1)
    prefill_only = make_seq("prefill-only", [*prompt, 8], max_new_tokens=0)
    plain = make_seq("plain", [*prompt, 9], max_new_tokens=2)
    batches = []
    model = FakeModel(sched.block_manager)
    for seq in (make_seq("warm", prompt, max_new_tokens=2), scoring, prefill_only, plain):
        sched.add(seq)
        while sched.has_unfinished_requests:
            batch = sched.schedule()
            check_invariants(sched, batch)
            rows = zip(batch.seqs, batch.num_new_tokens, batch.num_sampled, strict=True)
            batches.append([(s.request_id, n, do_sample) for s, n, do_sample in rows])
            sched.update(batch, model.run(batch))
    assert scoring.num_cached_tokens == 0 and plain.num_cached_tokens == 64
    assert prefill_only.num_cached_tokens == 64 and prefill_only.generated_token_ids == []
    assert prefill_only.finish_reason == "length"
    assert all(rid != "prefill-only" for step in batches for rid, _, do_sample in step if do_sample)
    computed = [n for step in batches for rid, n, _ in step if rid == "scoring"]
    assert computed[:3] == [24, 24, 17]  # every prompt position, in chunks of the budget
    assert [n for step in batches for rid, n, _ in step if rid == "prefill-only"] == [1]
    assert scoring.generated_token_ids == reference(scoring.prompt_token_ids, scoring.gen_config, 10**6, None)[0]


# ---- tokens in flight and multi-token steps ---------------------------------------------------------------------


def test_a_step_is_scheduled_before_the_previous_ones_tokens_are_back():
    """Overlap: the scheduler counts the token a launched step samples as pending and schedules its position next,
    without writing any value for it; `update` appends the real token later, in launch order."""
    sched = Scheduler(BlockManager(16, 4))
    model = FakeModel(sched.block_manager)
    sched.add(seq := make_seq("a", [1, 2, 3], max_new_tokens=5))
    first = sched.schedule()
    assert first.num_new_tokens == [3] and first.num_sampled == [1]
    assert seq.token_ids == [1, 2, 3] and seq.num_pending_tokens == 1 and seq.num_computed_tokens == 3
    result = model.run(first)
    second = sched.schedule()  # the first step's token is not back
    assert second.seqs == [seq] and second.starts == [3] and second.token_ids == [[]]  # its input is the pending one
    assert seq.num_pending_tokens == 2 and seq.num_computed_tokens == 4 and seq.token_ids == [1, 2, 3]
    assert sched.schedule().is_empty  # never more than one pending token ahead
    second_result = model.run(second)
    assert sched.update(first, result) == [(0, seq, 1)] and seq.num_generated == 1 and seq.num_pending_tokens == 1
    sched.update(second, second_result)
    assert seq.num_generated == 2 and seq.num_pending_tokens == 0
    run_all(sched, {}, model=model)
    assert seq.generated_token_ids == reference([1, 2, 3], seq.gen_config, 64, None)[0]


def test_host_token_work_and_the_last_token_are_never_run_ahead():
    """Penalties, bad words and grammars read the token values on the host: such a sequence waits for its token
    before its next step; so does one whose pending token is its last (max_new_tokens)."""
    sched = Scheduler(BlockManager(32, 4))
    model = FakeModel(sched.block_manager)
    sched.add(penalized := make_seq("p", [1, 2], max_new_tokens=5, repetition_penalty=1.2))
    sched.add(banned := Sequence("b", [1, 2], 2, GenerationConfig(max_new_tokens=5), bad_word_ids=[[7, 8]]))
    sched.add(short := make_seq("s", [1, 2], max_new_tokens=1))
    sched.add(plain := make_seq("q", [1, 2], max_new_tokens=5))
    first = sched.schedule()
    assert len(first.seqs) == 4 and all(s.num_pending_tokens == 1 for s in first.seqs)
    second = sched.schedule()
    assert second.seqs == [plain]
    sched.update(first, model.run(first))
    assert short.finish_reason == "length" and "s" in sched.schedule().finished_request_ids
    assert penalized.num_pending_tokens == 1 and banned.num_pending_tokens == 1  # scheduled again just now


@pytest.mark.parametrize("stop_at", range(4))
def test_a_stop_token_at_any_position_of_a_multi_token_step_ends_there(stop_at):
    """A step that samples 4 tokens for a sequence: a stop token at position `stop_at` ends the sequence with the
    tokens up to it; the tokens after it are dropped."""
    sched = Scheduler(BlockManager(16, 4), num_tokens_per_step=4)
    model = FakeModel(sched.block_manager)
    sched.add(seq := make_seq("a", [5, 6, 7], max_new_tokens=20, stop_token_ids=[31]))
    sched.update(prefill := sched.schedule(), model.run(prefill))
    batch = sched.schedule()
    assert batch.num_new_tokens == [4] and batch.num_sampled == [4]  # its last token and 3 positions of its own
    tokens = [11, 12, 13, 14]
    tokens[stop_at] = 31
    assert sched.update(batch, StepResult([tokens], [None])) == [(0, seq, stop_at + 1)]
    assert seq.generated_token_ids[1:] == tokens[: stop_at + 1] and seq.finish_reason == "stop"
    assert sched.block_manager.usage() == 0.0


def test_a_multi_token_step_respects_the_limits_and_rolls_back_rejected_positions():
    sched = Scheduler(BlockManager(16, 4), num_tokens_per_step=4)
    model = FakeModel(sched.block_manager)
    sched.add(seq := make_seq("a", [5, 6, 7], max_new_tokens=3))
    sched.update(prefill := sched.schedule(), model.run(prefill))
    batch = sched.schedule()
    assert batch.num_sampled == [2]  # 1 generated, 2 left
    assert seq.num_computed_tokens == 5
    sched.update(batch, StepResult([[9]], [None]))  # one of two accepted: its second position is recomputed
    assert seq.num_computed_tokens == 4 and seq.num_tokens == 5 and seq.num_pending_tokens == 0
    with pytest.raises(ValueError, match="samples 1"):
        sched.update(sched.schedule(), StepResult([[1, 2]], [None]))
