"""A KV cache smaller than the model's context: the session length the engine reports is what the cache holds, and
a request that could never fit is refused before it runs (instead of failing once it outgrows the cache)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

NUM_BLOCKS, BLOCK_SIZE = 4, 16
CAPACITY = NUM_BLOCKS * BLOCK_SIZE


@pytest.fixture(scope="module")
def small(default_model_dir):
    from lm_torch.engine import TorchEngine

    config = {"block_size": BLOCK_SIZE, "num_kv_blocks": NUM_BLOCKS, "session_len": 4096, "num_threads": 1}
    engine = TorchEngine.from_pretrained(default_model_dir, config)
    with Pipeline(AsyncPipeline(engine, default_model_dir)) as pipe:
        yield pipe


def _raw(pipe: Pipeline, prompt_ids: list[int], cfg: GenerationConfig) -> tuple[list[int], str, str | None]:
    async def run():
        ids, reason, error = [], None, None
        async for out in pipe.async_pipeline.engine.generate(EngineRequest(uuid.uuid4().hex, prompt_ids, cfg)):
            ids += out.token_ids
            reason, error = out.finish_reason, out.error
        return ids, reason, error

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


def test_the_session_length_is_what_the_kv_cache_holds(small):
    assert small.async_pipeline.engine.session_len == CAPACITY


def test_a_request_beyond_the_cache_is_refused_up_front(small):
    with pytest.raises(ValueError, match=f"exceeds the session length {CAPACITY}"):
        small("Tell me a long story.", GenerationConfig(max_new_tokens=CAPACITY))
    ids, reason, error = _raw(small, [1, 2, 3], GenerationConfig(max_new_tokens=CAPACITY))
    assert (ids, reason) == ([], "error") and f"{CAPACITY} (what the KV cache holds)" in error
    assert _raw(small, [1, 2, 3], GenerationConfig(max_new_tokens=4, ignore_eos=True))[1] == "length"


def test_without_max_new_tokens_the_answer_stops_where_the_cache_ends(small):
    reply = small("Tell me a long story.", GenerationConfig(ignore_eos=True))
    assert reply.finish_reason == "length" and reply.input_token_len + reply.generate_token_len == CAPACITY
