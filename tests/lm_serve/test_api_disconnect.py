"""Clients that go away: their engine requests are aborted and their KV blocks freed (read from /metrics)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def _wait_for_idle(scrape, server, timeout=120.0) -> dict[str, float]:
    """Poll /metrics until the engine holds nothing; the samples at that point (or the last ones on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        idle = (
            samples["lm_kv_cache_usage_ratio"] == 0.0
            and samples["lm_requests_running"] == 0.0
            and samples["lm_requests_waiting"] == 0.0
            and samples["lm_http_requests_in_flight"] == 0.0
        )
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_fifty_streams_cancelled_midway_free_every_kv_block(api_server, api_key, client, scrape):
    # Every fifth request samples two choices, so the n > 1 fan-out is aborted too.
    num_choices = [2 if i % 5 == 0 else 1 for i in range(50)]

    async def cancel_one(aclient: openai.AsyncOpenAI, i: int) -> int:
        stream = await aclient.chat.completions.create(
            n=num_choices[i],
            model="smol",
            messages=MESSAGES,
            max_tokens=400,
            temperature=1.0,
            seed=i,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        async for _chunk in stream:
            received += 1
            if received == 3:  # the role chunk and two pieces of text
                break
        await stream.close()
        return received

    async def run() -> list[int]:
        aclient = openai.AsyncOpenAI(base_url=f"{api_server.url}/v1", api_key=api_key, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(cancel_one(aclient, i) for i in range(50)))
        finally:
            await aclient.close()

    before = scrape(api_server)
    assert asyncio.run(run()) == [3] * 50
    after = _wait_for_idle(scrape, api_server)
    assert after["lm_kv_cache_usage_ratio"] == 0.0, after
    assert after["lm_requests_running"] == 0.0 and after["lm_requests_waiting"] == 0.0
    aborted = after.get('lm_requests_finished_total{finish_reason="abort"}', 0) - before.get(
        'lm_requests_finished_total{finish_reason="abort"}', 0
    )
    assert aborted == sum(num_choices)
    # Far fewer tokens than 60 x 400 were generated: the requests really stopped.
    assert after["lm_generation_tokens_total"] - before["lm_generation_tokens_total"] < 50 * 400 / 4
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens == 4


def test_non_streamed_request_is_aborted_when_its_client_leaves(api_server, api_key, client, scrape):
    before = scrape(api_server)
    body = {"model": "smol", "messages": MESSAGES, "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    try:
        httpx.post(
            f"{api_server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(30, read=1.0),  # give up long before 450 tokens are generated
        )
        raise AssertionError("the request should have timed out on the client side")
    except httpx.ReadTimeout:
        pass
    after = _wait_for_idle(scrape, api_server)
    assert after["lm_kv_cache_usage_ratio"] == 0.0, after
    generated = after["lm_generation_tokens_total"] - before["lm_generation_tokens_total"]
    assert generated < 450, generated
    assert after['lm_requests_finished_total{finish_reason="abort"}'] > before.get(
        'lm_requests_finished_total{finish_reason="abort"}', 0
    )
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens == 4
