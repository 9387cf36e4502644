"""`--max-concurrent-requests` (sequences: prompts x n): one too many gets a 429 at once, a request larger than the
limit a 400; a server without `--api-keys` is open."""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Count to a hundred."}]


@pytest.fixture(scope="module")
def limited_server(start_server):
    return start_server(
        "--session-len", "256", "--num-kv-blocks", "32", "--max-concurrent-requests", "2", "--num-threads", "1"
    )


def test_requests_beyond_the_limit_get_429_and_later_ones_are_served(limited_server):
    # No --api-keys on this server: any key (the client needs one) is accepted.
    client = openai.OpenAI(base_url=f"{limited_server.url}/v1", api_key="anything", max_retries=0)
    model = client.models.list().data[0].id
    streams = [
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in range(2)
    ]
    for stream in streams:
        next(iter(stream))  # both are running
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 429
    assert info.value.body["code"] == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "1"
    # Requests that generate nothing are not limited.
    assert httpx.get(f"{limited_server.url}/health").status_code == 200
    assert client.models.list().data
    for stream in streams:
        stream.close()
    # Slots are freed as the streams end; the next request is answered (allow the server a moment to notice).
    for _ in range(100):
        try:
            reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)
            break
        except openai.RateLimitError:
            import time

            time.sleep(0.1)
    else:
        raise AssertionError("the freed slots were never given back")
    assert reply.usage.completion_tokens == 2


def test_a_request_with_more_sequences_than_the_limit_gets_400(limited_server):
    # --max-concurrent-requests counts sequences (prompts x n): n=3 can never run under a limit of 2.
    client = openai.OpenAI(base_url=f"{limited_server.url}/v1", api_key="anything", max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, n=3)
    assert info.value.body["code"] == "too_many_sequences" and info.value.body["param"] == "n"
    assert "at most 2 at once (--max-concurrent-requests)" in info.value.body["message"]
    assert len(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, n=2).choices) == 2
