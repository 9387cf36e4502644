"""Data parallelism on the CPU: `TorchEngine.from_pretrained(path, {"dp": 2})` is lm-core's `DataParallelEngine` over
two real lm-torch engines, and `lm serve api_server --dp 2` serves it.

The model is a tiny random Llama with the default model's tokenizer (so that chat runs as it does for users). The
replicas are compared with one engine of the same config: greedy outputs must be equal token for token (the CPU
engine's outputs do not depend on what else is in the batch). Which replica a request went to is read from the
engine's own counts (`stats().extra`) and, for the server, from `/metrics`.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.data_parallel import DataParallelEngine
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")

ENGINE_CONFIG = {"block_size": 16, "num_kv_blocks": 256, "max_batch_size": 16, "num_threads": 1, "device": "cpu"}
READY_PREFIX = "lm-serve: ready at "
# Upper bound on any wait; reaching it means the test failed.
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir, tiny_models) -> Path:
    """A random 2-layer Llama over the default model's vocabulary, saved with its tokenizer."""
    return tiny_models.make_engine_llama(tmp_path_factory.mktemp("tiny-llama-dp"), default_model_dir)


def make_pipe(model_dir: Path, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {**ENGINE_CONFIG, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def single(tiny_model):
    with make_pipe(tiny_model) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def replicated(tiny_model):
    with make_pipe(tiny_model, dp=2) as pipe:
        yield pipe


def engine_of(pipe: Pipeline) -> DataParallelEngine:
    engine = pipe.async_pipeline.engine
    assert isinstance(engine, DataParallelEngine)
    return engine


def run(pipe: Pipeline, coroutine):
    """Run `coroutine` on the pipeline's event loop, where its engine's step loops run."""
    return asyncio.run_coroutine_threadsafe(coroutine, pipe._loop).result(timeout=DEADLINE_S)


def prompts(n: int, seed: int, low: int = 20, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def request(prompt: list[int], max_new_tokens: int, request_id: str | None = None) -> EngineRequest:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    return EngineRequest(request_id or uuid.uuid4().hex, prompt, cfg)


def routed(pipe: Pipeline) -> list[int]:
    return engine_of(pipe).stats().extra["num_routed"]


def assert_idle(engine: DataParallelEngine) -> None:
    stats = engine.stats()
    assert stats.extra["num_in_flight"] == [0, 0]
    for replica in stats.extra["replicas"]:
        assert (replica.num_running, replica.num_waiting, replica.kv_usage) == (0, 0, 0.0)


def test_dp_builds_replicas_behind_one_engine_that_is_never_selected_itself(tiny_model, replicated, single):
    from lm_core.engine_registry import available_engines, select_engine
    from lm_torch.engine import TorchEngine

    engine = engine_of(replicated)
    assert len(engine.replicas) == 2 and all(isinstance(r, TorchEngine) for r in engine.replicas)
    assert engine.replicas[0] is not engine.replicas[1]
    assert engine.session_len == single.async_pipeline.engine.session_len
    assert select_engine("auto", tiny_model) is TorchEngine
    assert "DataParallelEngine" not in available_engines() and not DataParallelEngine.supports(tiny_model)
    with pytest.raises(NotImplementedError, match="dp"):
        DataParallelEngine.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="at least one engine"):
        DataParallelEngine([])


def test_concurrent_requests_spread_over_both_replicas_with_a_single_engines_outputs(replicated, single):
    batch = prompts(8, seed=1)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    before = routed(replicated)
    ours = replicated(batch, cfg)
    after = routed(replicated)
    reference = single(batch, cfg)
    assert [r.token_ids for r in ours] == [r.token_ids for r in reference]
    assert all(r.finish_reason == "length" for r in ours)
    counts = [b - a for a, b in zip(before, after, strict=True)]
    # Eight requests at once, no shared prefixes: the least-loaded rule alternates, whatever each request's timing.
    assert sum(counts) == 8 and min(counts) >= 2, counts
    assert_idle(engine_of(replicated))


def test_abort_reaches_the_replica_that_runs_the_request(replicated):
    engine = engine_of(replicated)

    async def scenario(victim: int):
        # Two requests at once go to different replicas; the `victim`-th started is aborted.
        ids = [uuid.uuid4().hex for _ in range(2)]
        streams = [engine.generate(request(p, 64, i)) for p, i in zip(prompts(2, seed=20 + victim), ids, strict=True)]
        for stream in streams:
            await stream.__anext__()
        running = [replica.num_running for replica in engine.stats().extra["replicas"]]
        await engine.abort(ids[victim])
        await engine.abort("no-such-request")  # nothing to abort: no error
        reasons = []
        for stream in streams:
            reasons.append([out.finish_reason async for out in stream][-1])
        return running, reasons

    # The first request started goes to the same replica both times (both idle, the turn back where it was): so the
    # two runs abort a request on each replica.
    for victim in (0, 1):
        running, reasons = run(replicated, scenario(victim))
        assert running == [1, 1]
        assert reasons == ["abort" if i == victim else "length" for i in range(2)]
        assert_idle(engine)


def test_a_stream_closed_early_frees_its_slot_and_its_id(replicated):
    engine = engine_of(replicated)
    prompt = prompts(1, seed=3)[0]

    async def scenario():
        stream = engine.generate(request(prompt, 400, request_id="closed-early"))
        first = await stream.__anext__()
        in_flight = sum(engine.stats().extra["num_in_flight"])
        await stream.aclose()  # the replica's stream closes too, and aborts the request there
        idle = engine.stats()
        again = [out async for out in engine.generate(request(prompt, 4, request_id="closed-early"))]
        return first, in_flight, idle, again

    first, in_flight, idle, again = run(replicated, scenario())
    assert first.finish_reason is None and in_flight == 1
    assert idle.extra["num_in_flight"] == [0, 0] and idle.num_running == 0 and idle.kv_usage == 0.0
    assert again[-1].finish_reason == "length" and sum(len(out.token_ids) for out in again) == 4
    assert_idle(engine)


def test_a_request_id_in_use_is_refused(replicated):
    engine = engine_of(replicated)
    first_prompt, second_prompt = prompts(2, seed=10)

    async def scenario():
        running = engine.generate(request(first_prompt, 400, request_id="twice"))
        await running.__anext__()
        refused = [out async for out in engine.generate(request(second_prompt, 4, request_id="twice"))]
        in_flight = sum(engine.stats().extra["num_in_flight"])
        await running.aclose()
        return refused, in_flight

    refused, in_flight = run(replicated, scenario())
    assert len(refused) == 1 and refused[0].finish_reason == "error" and "in use" in refused[0].error
    assert in_flight == 1  # the refused request was never routed
    assert_idle(engine)


def test_a_shared_prefix_stays_on_one_replica_and_hits_its_prefix_cache(replicated):
    engine = engine_of(replicated)
    rng = random.Random(5)
    shared = [rng.randrange(100, 40000) for _ in range(64)]  # four whole blocks
    requests = [shared + [rng.randrange(100, 40000) for _ in range(8)] for _ in range(4)]

    async def one(prompt):
        cached = 0
        async for out in engine.generate(request(prompt, 4)):
            cached = max(cached, out.num_cached_tokens)
        return cached

    before = routed(replicated)
    cached = [run(replicated, one(prompt)) for prompt in requests]  # one after the other: both replicas idle
    counts = [b - a for a, b in zip(before, routed(replicated), strict=True)]
    assert sorted(counts) == [0, 4], counts
    assert cached[0] == 0 and all(c >= 48 for c in cached[1:]), cached


def test_embeddings_are_routed_and_equal_a_single_engines(replicated, single):
    engine = engine_of(replicated)
    ids = prompts(1, seed=6)[0]
    before = sum(routed(replicated))
    ours = run(replicated, engine.embed(ids, "mean", True))
    reference = run(single, single.async_pipeline.engine.embed(ids, "mean", True))
    assert sum(routed(replicated)) == before + 1
    assert torch.allclose(torch.tensor(ours), torch.tensor(reference), atol=1e-6)
    assert_idle(engine)


@pytest.mark.slow
def test_a_failed_replica_gets_no_more_requests(tiny_model):
    """Each replica of 2 ranks (worker processes); killing a worker fails its replica (lm-torch notices at its next
    step). New requests then go to the other replica; once both have failed the engine reports a failure."""
    import os
    import signal

    pipe = make_pipe(tiny_model, dp=2, tp=2, dist_timeout=30)
    engine = engine_of(pipe)

    async def finish_reasons(batch: list[list[int]], max_new_tokens: int) -> list[str]:
        async def one(prompt):
            return [out.finish_reason async for out in engine.generate(request(prompt, max_new_tokens))][-1]

        return await asyncio.gather(*(one(prompt) for prompt in batch))

    async def fail_replica(index: int, seed: int) -> list[str]:
        # A long request on replica `index` (idle and in turn, or the only one left); then one of its workers killed.
        replica = engine.replicas[index]
        running = asyncio.ensure_future(finish_reasons(prompts(1, seed=seed), 500))
        while replica.stats().num_running < 1:
            await asyncio.sleep(0.05)
        os.kill(replica.executor._workers.processes[1].pid, signal.SIGKILL)
        return await asyncio.wait_for(running, DEADLINE_S)

    async def scenario():
        first = await fail_replica(0, seed=40)  # a fresh router, both idle: the first request goes to replica 0
        assert engine.replicas[0].failure is not None and engine.failure is None
        before = routed(pipe)
        after = await finish_reasons(prompts(4, seed=41), 8)
        counts = [b - a for a, b in zip(before, routed(pipe), strict=True)]
        last = await fail_replica(1, seed=42)
        return first, counts, after, last, await finish_reasons(prompts(1, seed=43), 8)

    try:
        first, counts, after, last, none_left = run(pipe, scenario())
        assert first == ["error"]  # the request on the failed replica
        assert counts == [0, 4] and after == ["length"] * 4
        assert last == ["error"] and none_left == ["error"]
        assert "replica 0: " in engine.failure and "replica 1: " in engine.failure
    finally:
        pipe.close()
