"""lm-core owns the text over the real engine: a chat request is rendered once (the server renders through the
pipeline), bad words reach the engine as token ids, and a request is aborted once, by the engine, when its stream
closes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lm_core.async_pipeline import AsyncPipeline
from lm_core.generation_config import GenerationConfig
from lm_serve.app import build_app

transformers = pytest.importorskip("transformers")
CONFIG = {"session_len": 512, "num_kv_blocks": 64, "max_batch_size": 16, "num_threads": 1}


class Spy:
    """Counts the calls of one real method (and records their arguments) while it keeps working."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls: list[tuple] = []
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def pipe(default_model_dir, loop):
    pipe = AsyncPipeline.from_model(str(default_model_dir), backend="torch", backend_config=CONFIG)
    yield pipe
    loop.run_until_complete(pipe.close())


def _wait_idle(pipe, loop, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pipe.engine.stats().num_running == 0 and pipe.engine.stats().num_waiting == 0:
            return True
        loop.run_until_complete(asyncio.sleep(0.05))
    return False


def test_a_chat_request_is_rendered_once_and_its_bad_words_reach_the_engine_as_ids(
    pipe, loop, monkeypatch, default_model_dir
):
    renders = Spy(monkeypatch, pipe.chat_template, "render")
    submitted = Spy(monkeypatch, pipe.engine, "generate")
    app = build_app(pipe, ["smol"], close_pipeline_on_shutdown=False)
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
        "bad_words": ["Paris"],
    }

    async def post(stream: bool) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={**body, "stream": stream})

    for stream in (False, True):
        before = len(renders.calls)
        reply = loop.run_until_complete(post(stream))
        assert reply.status_code == 200, reply.text
        assert len(renders.calls) - before == 1, "one render per request"
    hf = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    expected = {tuple(hf.encode(w, add_special_tokens=False)) for w in ("Paris", " Paris")}
    (request,) = submitted.calls[-1]
    assert {tuple(ids) for ids in request.bad_word_ids} == expected
    assert "Paris" not in reply.text


def test_a_closed_stream_is_aborted_by_the_engine_alone(pipe, loop, monkeypatch):
    aborts = Spy(monkeypatch, pipe.engine, "abort")
    config = GenerationConfig(max_new_tokens=200, ignore_eos=True)

    async def leave_after_one_piece() -> None:
        stream = pipe.generate("Tell me a story.", config)
        await anext(stream)
        await stream.aclose()

    async def stop_string() -> str:
        stop = GenerationConfig(max_new_tokens=200, ignore_eos=True, stop_words=[" "])
        return "".join([p.text async for p in pipe.generate("Tell me a story.", stop)])

    loop.run_until_complete(leave_after_one_piece())
    assert _wait_idle(pipe, loop), "closing the stream must free the request"
    loop.run_until_complete(stop_string())
    assert _wait_idle(pipe, loop), "a matched stop string must free the request"
    assert aborts.calls == [], "the pipeline leaves the abort to the engine's stream"

    async def abort_explicitly() -> list:
        stream = pipe.generate("Tell me a story.", config, request_id="explicit")
        first = await anext(stream)
        await pipe.abort("explicit")
        return [first, *[p async for p in stream]]

    pieces = loop.run_until_complete(abort_explicitly())
    assert pieces[-1].finish_reason == "abort"
    assert aborts.calls == [("explicit",)], "an explicit abort is the only call"
    assert _wait_idle(pipe, loop)
