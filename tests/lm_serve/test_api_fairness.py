"""One request cannot starve the others: a flood of sequences in one request and a small request sent after it; the
per-request sequence limit (400), `--max-concurrent-requests` counted in sequences (429), and requests that could
never fit in the KV cache refused up front (400)."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

MAX_CONCURRENT = 1000
MAX_PER_REQUEST = 900
# 64 KV blocks of 16 tokens (LIGHT_FLAGS): a session length beyond what the cache holds.
KV_CAPACITY = 64 * 16


@pytest.fixture(scope="module")
def server(start_server, light_flags):
    return start_server(
        *light_flags,
        "--session-len",
        "4096",
        "--block-size",
        "16",
        "--max-concurrent-requests",
        str(MAX_CONCURRENT),
        "--max-sequences-per-request",
        str(MAX_PER_REQUEST),
    )


class _Client(httpx.Client):
    """httpx on the module's server; JSON bodies get the served model's name."""

    model = ""

    def post(self, url, *, json, **kwargs):
        return super().post(url, json={"model": self.model, **json}, **kwargs)


@pytest.fixture(scope="module")
def api(server):
    with _Client(base_url=server.url, timeout=120) as client:
        client.model = client.get("/v1/models").json()["data"][0]["id"]
        yield client


def _small(api: httpx.Client) -> float:
    """Seconds for a 4-token completion."""
    start = time.perf_counter()
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    reply = api.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    return elapsed


class _Flood:
    """One streamed request of `num_prompts` prompts x n=8 in a thread, until `stop()` closes it (an abort)."""

    def __init__(self, url: str, model: str, num_prompts: int) -> None:
        self.started = threading.Event()
        self._stop = threading.Event()
        self.status: int | None = None
        body = {
            "model": model,
            "prompt": [f"Story number {i}: once upon a time" for i in range(num_prompts)],
            "n": 8,
            "max_tokens": 16,
            "temperature": 1.0,
            "ignore_eos": True,
            "stream": True,
        }
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=300) as c, c.stream("POST", "/v1/completions", json=body) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.started.set()
                if self._stop.is_set():
                    break
        self.started.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _running(api: httpx.Client) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith("lm_requests_running "):
            return float(line.split()[1])
    raise AssertionError("no lm_requests_running in /metrics")


@pytest.mark.slow
def test_a_small_request_behind_a_flood_is_served_about_as_fast_as_alone(server, api):
    _small(api)  # warm-up
    idle = statistics.median(_small(api) for _ in range(3))
    flood = _Flood(server.url, api.model, 100)  # 800 sequences of 16 tokens: about 800 steps of a full batch
    try:
        assert flood.started.wait(120) and flood.status == 200
        assert _running(api) >= 8  # the flood fills the batch
        # First come first served, the small request would wait for the whole flood (~100x its idle latency);
        # fairly scheduled it takes the next free slot and runs in a batch of 16 instead of 1.
        loaded = min(_small(api) for _ in range(2))
        assert _running(api) >= 8, "the flood ended early: the measurement is not behind it"
        assert loaded < 10 * idle + 1.0, f"{loaded:.2f} s behind the flood, {idle:.2f} s alone"
    finally:
        flood.stop()


def test_the_sequence_limits_per_request_and_at_once(server, api):
    too_many = api.post(
        "/v1/completions", json={"prompt": ["Hi"] * (MAX_PER_REQUEST // 8 + 1), "n": 8, "max_tokens": 1}
    )
    assert too_many.status_code == 400
    error = too_many.json()["error"]
    assert error["code"] == "too_many_sequences" and error["param"] == "prompt"
    assert f"at most {MAX_PER_REQUEST} per request (--max-sequences-per-request)" in error["message"]
    one_prompt = api.post("/v1/completions", json={"prompt": "Hi", "n": MAX_PER_REQUEST + 1, "max_tokens": 1})
    assert one_prompt.status_code == 400 and one_prompt.json()["error"]["param"] == "n"
    # --max-concurrent-requests counts sequences: 100 prompts x n=8 hold 800 of the 1000.
    flood = _Flood(server.url, api.model, 100)
    try:
        assert flood.started.wait(120) and flood.status == 200
        over = api.post("/v1/completions", json={"prompt": ["Hi"] * 26, "n": 8, "max_tokens": 1})  # 208 more
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "rate_limit_exceeded" and over.headers["retry-after"] == "1"
        assert "1000 sequences at once" in over.json()["error"]["message"]
        within = api.post("/v1/completions", json={"prompt": ["Hi"] * 20, "n": 8, "max_tokens": 1})  # 160 more
        assert within.status_code == 200, within.text
        assert len(within.json()["choices"]) == 160
    finally:
        flood.stop()


def test_a_request_that_can_never_fit_in_the_kv_cache_is_refused_at_once(api):
    assert api.get("/v1/models").json()["data"][0]["max_model_len"] == KV_CAPACITY
    start = time.perf_counter()
    reply = api.post("/v1/completions", json={"prompt": "Tell me a story.", "max_tokens": 2000, "ignore_eos": True})
    assert reply.status_code == 400, reply.text
    assert time.perf_counter() - start < 10
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and str(KV_CAPACITY) in error["message"]
    chat = api.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": KV_CAPACITY, "ignore_eos": True},
    )
    assert chat.status_code == 400 and str(KV_CAPACITY) in chat.json()["error"]["message"]
