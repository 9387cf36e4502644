"""The HTTP layer over a scripted engine, for what the real engine does not do on demand: refusing a request after
validation, and failing in the middle of a generation. (The real-engine tests cover everything else.)"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from lm_core.async_pipeline import AsyncPipeline
from lm_core.engine import Engine, EngineOutput, EngineStats
from lm_serve.app import build_app

REFUSE = "please refuse"
FAIL = "please fail"


class ScriptedEngine(Engine):
    """Refuses prompts containing REFUSE, fails after two tokens for FAIL, else writes tokens 100.. and stops."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.aborted: list[str] = []

    @classmethod
    def from_pretrained(cls, model_path, config=None):
        raise NotImplementedError

    @property
    def session_len(self) -> int:
        return 2048

    async def generate(self, request):
        text = self.tokenizer.decode(request.prompt_token_ids)
        if REFUSE in text:
            yield EngineOutput(request.request_id, [], "error", error="the scripted engine refuses this")
            return
        for step in range(4):
            await asyncio.sleep(0)
            if FAIL in text and step == 2:
                yield EngineOutput(request.request_id, [], "error", error="the scripted engine failed")
                return
            yield EngineOutput(request.request_id, [100 + step], "length" if step == 3 else None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats()

    async def close(self) -> None:
        pass


@pytest.fixture
def client(default_model_dir):
    from lm_core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(default_model_dir)
    app = build_app(AsyncPipeline(ScriptedEngine(tokenizer), default_model_dir), ["scripted"])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)


def _chat(client, content, stream):
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": content}], stream=stream, temperature=0
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_engine_refuses_is_a_400_even_when_streamed(client, stream):
    async def run():
        with pytest.raises(openai.BadRequestError) as info:
            await _chat(client, REFUSE, stream)
        assert "refuses" in info.value.body["message"]

    asyncio.run(run())


def test_an_engine_failure_mid_stream_ends_the_stream_with_an_error_event(client):
    async def run():
        stream = await _chat(client, FAIL, True)
        received = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk)
        assert "failed" in info.value.message
        assert received  # the stream had started: the role chunk and the text so far

    asyncio.run(run())


def test_an_engine_failure_without_streaming_is_a_500(client):
    async def run():
        with pytest.raises(openai.InternalServerError) as info:
            await _chat(client, FAIL, False)
        assert "failed" in info.value.body["message"]
        ok = await _chat(client, "hello", False)
        assert ok.choices[0].finish_reason == "length"

    asyncio.run(run())


def test_a_responses_stream_that_fails_sends_error_and_response_failed(client):
    async def run():
        stream = await client.responses.create(model="scripted", input=FAIL, stream=True)
        events = [event async for event in stream]
        types = [e.type for e in events]
        assert types[:2] == ["response.created", "response.in_progress"]
        assert types[-2:] == ["error", "response.failed"]
        assert "failed" in events[-2].message
        assert events[-1].response.status == "failed"

    asyncio.run(run())
