"""The engine with tensor parallelism on the CPU: worker processes joined by gloo, driven by the engine's scheduler.

The model is a tiny random Llama (4 heads over 2 KV heads, so tp 2 splits both) with the default model's tokenizer,
so that guided decoding and chat run as they do for users. Every output of the tp 2 engine must equal the tp 1
engine's: greedy tokens (where the tp 1 run's two best tokens are not tied), their logprobs, seeded samples, prefix-
cache hits, preemption under a tiny KV budget, n > 1, guided JSON. A worker killed mid-run must end every request
with an error quickly, and leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")


# Where tp 1's two best logprobs at a step are closer than this, either token is a correct greedy choice.
TIE_TOLERANCE = 1e-4
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir, tiny_models) -> Path:
    """A random 2-layer Llama over the default model's vocabulary and tokenizer (`tiny_models.make_engine_llama`)."""
    return tiny_models.make_engine_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


def make_pipe(model_dir: Path, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, "num_kv_blocks": 512, **config})
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def single(tiny_model):
    with make_pipe(tiny_model) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def split(tiny_model):
    with make_pipe(tiny_model, tp=2) as pipe:
        yield pipe


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [
        torch.randint(100, 40000, (int(k),), generator=rng).tolist() for k in torch.randint(5, 60, (n,), generator=rng)
    ]


def _same_greedy(ours, reference) -> None:
    """Tokens equal up to the first step where the reference's two best logprobs tie; logprobs close before it."""
    for step, (a, b) in enumerate(zip(ours.token_ids, reference.token_ids, strict=False)):
        top = sorted(reference.logprobs[step].values(), reverse=True)
        if a != b:
            assert top[0] - top[1] < TIE_TOLERANCE, f"step {step}: {a} != {b}, top-2 gap {top[0] - top[1]:.2e}"
            return
        assert abs(ours.logprobs[step][a] - reference.logprobs[step][b]) < LOGPROB_TOLERANCE
    assert len(ours.token_ids) == len(reference.token_ids)


def _engine_generate(pipe: Pipeline, prompt_ids: list[int], cfg: GenerationConfig) -> tuple[list[int], int, str]:
    async def run():
        ids, cached, reason = [], 0, None
        async for out in pipe.async_pipeline.engine.generate(EngineRequest(uuid.uuid4().hex, prompt_ids, cfg)):
            ids += out.token_ids
            cached = max(cached, out.num_cached_tokens)
            reason = out.finish_reason
        return ids, cached, reason

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


def test_startup_summary_names_the_split(split):
    executor = split.async_pipeline.engine.executor
    text = executor.summary()
    assert "2 processes (tensor parallel 2 over gloo; this is rank 0)" in text
    assert "rank 0:" in text and "rank 1:" in text


def test_greedy_tokens_and_logprobs_match_tp1(single, split):
    prompts = _prompts(8, seed=1)
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True, logprobs=2)
    for ours, reference in zip(split(prompts, cfg), single(prompts, cfg), strict=True):
        _same_greedy(ours, reference)


def test_chat_and_seeded_sampling_match_tp1(single, split):
    messages = [[{"role": "user", "content": "Tell me a story."}], [{"role": "user", "content": "Hi"}]]
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, random_seed=7, max_new_tokens=24)
    assert [r.token_ids for r in split(messages, cfg)] == [r.token_ids for r in single(messages, cfg)]


def test_n_greater_than_one_matches_tp1(single, split):
    cfg = GenerationConfig(n=3, do_sample=True, temperature=0.8, random_seed=11, max_new_tokens=16, ignore_eos=True)
    ours, reference = split("Name three colours.", cfg), single("Name three colours.", cfg)
    assert [r.token_ids for r in ours] == [r.token_ids for r in reference]
    assert len({tuple(r.token_ids) for r in ours}) > 1


def test_prefix_cache_hits_give_the_uncached_outputs(single, split):
    rng = torch.Generator().manual_seed(3)
    prefix = torch.randint(100, 40000, (200,), generator=rng).tolist()
    first = prefix + torch.randint(100, 40000, (10,), generator=rng).tolist()
    second = prefix + torch.randint(100, 40000, (20,), generator=rng).tolist()
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    _engine_generate(split, first, cfg)
    ids, cached, _ = _engine_generate(split, second, cfg)
    assert cached >= 192
    assert ids == _engine_generate(single, second, cfg)[0]


def test_preemption_under_a_tiny_kv_budget_matches_tp1(tiny_model, single):
    prompts = _prompts(16, seed=4)
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    reference = [r.token_ids for r in single(prompts, cfg)]
    with make_pipe(tiny_model, tp=2, num_kv_blocks=8, max_batch_size=16) as small:
        responses = small(prompts, cfg)
        assert [r.token_ids for r in responses] == reference
        assert small.async_pipeline.engine.scheduler.num_preemptions > 0


def test_guided_json_matches_tp1(single, split):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    cfg = GenerationConfig(
        max_new_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    )
    prompt = [{"role": "user", "content": "Give me a person as JSON."}]
    ours, reference = split(prompt, cfg), single(prompt, cfg)
    assert ours.token_ids == reference.token_ids
    if ours.finish_reason == "stop":
        value = json.loads(ours.text, strict=False)  # xgrammar lets control characters into strings
        assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_abort_mid_generation_and_keep_serving(split):
    engine = split.async_pipeline.engine

    async def scenario():
        request = EngineRequest(
            uuid.uuid4().hex, _prompts(1, seed=5)[0], GenerationConfig(max_new_tokens=400, ignore_eos=True)
        )
        stream = engine.generate(request)
        first = await stream.__anext__()
        await engine.abort(request.request_id)
        reasons = [out.finish_reason async for out in stream]
        return first, reasons

    first, reasons = asyncio.run_coroutine_threadsafe(scenario(), split._loop).result(timeout=60)
    assert first.finish_reason is None and reasons[-1] == "abort"
    assert split("Hello", GenerationConfig(max_new_tokens=4, ignore_eos=True)).finish_reason == "length"
    assert engine.stats().num_running == 0


def test_a_killed_worker_fails_every_request_and_leaves_no_process(tiny_model):
    # A collective's timeout far above the bound below: the failure must come from the watcher, not a timeout.
    pipe = make_pipe(tiny_model, tp=2, dist_timeout=300)
    engine = pipe.async_pipeline.engine
    processes = list(engine.executor._workers.processes)
    cfg = GenerationConfig(max_new_tokens=1000, ignore_eos=True)

    async def run(prompt):
        reason, error = None, None
        async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt, cfg)):
            reason, error = out.finish_reason, out.error
        return reason, error

    async def scenario():
        tasks = [asyncio.ensure_future(run(p)) for p in _prompts(4, seed=6)]
        await asyncio.sleep(2.0)  # the requests are decoding
        os.kill(processes[1].pid, signal.SIGKILL)
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        after = await asyncio.wait_for(run([1, 2, 3]), timeout=30)
        return results, after, time.monotonic() - started

    try:
        results, after, seconds = asyncio.run_coroutine_threadsafe(scenario(), pipe._loop).result(timeout=120)
        assert all(reason == "error" for reason, _ in results), results
        assert any("rank 1" in (error or "") for _, error in results), results
        assert after[0] == "error" and "worker group failed" in (after[1] or "")
        assert seconds < 60, seconds
    finally:
        pipe.close()
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in processes)


def test_two_nodes_on_loopback_give_the_tp1_outputs(tiny_model, single):
    """`--nnodes 2 --node-rank 0/1 --dist-init-addr`: node 1 is another process running only its rank (the same
    engine config with node_rank 1); node 0's engine drives both."""
    import subprocess
    import sys

    from lm_torch.distributed.executor import free_port

    addr = f"127.0.0.1:{free_port()}"
    nodes = {"tp": 2, "nnodes": 2, "dist_init_addr": addr, "block_size": 16, "num_kv_blocks": 512}
    code = (
        "import sys; from lm_torch.engine import TorchEngine; "
        f"TorchEngine.from_pretrained(sys.argv[1], {{**{nodes!r}, 'node_rank': 1}})"
    )
    node1 = subprocess.Popen([sys.executable, "-c", code, str(tiny_model)], stderr=subprocess.PIPE, text=True)
    try:
        with make_pipe(
            tiny_model, **{k: v for k, v in nodes.items() if k not in ("block_size", "num_kv_blocks")}, node_rank=0
        ) as pipe:
            summary = pipe.async_pipeline.engine.executor.summary()
            prompts = _prompts(4, seed=8)
            cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True, logprobs=2)
            for ours, reference in zip(pipe(prompts, cfg), single(prompts, cfg), strict=True):
                _same_greedy(ours, reference)
        _, err = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node1.returncode == 0, err
    assert "rank 0:" in summary and "node 1 of 2: tensor-parallel ranks 1-1" in err


def test_dummy_weights_are_the_same_model_at_every_tp(tiny_model):
    """`load_format` dummy: each rank keeps its part of the unsplit model's random tensors, so tp 2 decodes what
    tp 1 does (what lets a benchmark compare sizes on dummy weights)."""
    prompts = _prompts(3, seed=10)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=2)
    with make_pipe(tiny_model, load_format="dummy") as one:
        reference = one(prompts, cfg)
    with make_pipe(tiny_model, load_format="dummy", tp=2) as two:
        for ours, ref in zip(two(prompts, cfg), reference, strict=True):
            _same_greedy(ours, ref)
