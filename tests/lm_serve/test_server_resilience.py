"""The server against traffic that used to stall or cut it: oversized bodies, connections that never finish a request
head, and SIGTERM with requests in flight. Each test starts a server of its own (raw sockets and signals)."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import LIGHT_FLAGS

LIMIT = 1024 * 1024
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def guarded_server(start_server):
    return start_server(
        *LIGHT_FLAGS, "--model-name", "smol", "--max-request-bytes", str(LIMIT), "--header-timeout", str(HEADER_TIMEOUT)
    )


def _address(server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port


def _chat_body(content: str) -> bytes:
    return json.dumps({"model": "smol", "messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()


class _Streams:
    """Streamed completions in threads, recording when each chunk arrived."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.arrivals: list[list[float]] = [[] for _ in range(count)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        while not self.stop.is_set():
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.arrivals[i].append(time.monotonic())
                    if self.stop.is_set():
                        return

    def max_gap(self, start: float, end: float) -> float:
        """The longest wait for a chunk, over waits that overlap [start, end]."""
        gaps = [b - a for times in self.arrivals for a, b in itertools.pairwise(times) if b >= start and a <= end]
        assert gaps, "the streams produced no chunks in the window"
        return max(gaps)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.mark.slow
def test_big_bodies_do_not_stall_other_streams(guarded_server):
    streams = _Streams(guarded_server.url, 2)
    try:
        deadline = time.monotonic() + 60
        while not all(len(a) > 5 for a in streams.arrivals) and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        time.sleep(3)
        baseline = streams.max_gap(start, time.monotonic())

        headers = {"content-type": "application/json"}
        start = time.monotonic()
        huge = httpx.post(
            f"{guarded_server.url}/v1/chat/completions",
            content=_chat_body("hello world " * 900_000),
            headers=headers,
            timeout=120,
        )
        # Just under the limit: read, parsed and tokenized (~200k tokens), then refused as too long for the context.
        under = _chat_body("hello world " * ((LIMIT - 200) // 12))
        assert len(under) < LIMIT
        long = httpx.post(f"{guarded_server.url}/v1/chat/completions", content=under, headers=headers, timeout=300)
        end = time.monotonic()
        during = streams.max_gap(start, end)
    finally:
        streams.close()
    assert huge.status_code == 413, huge.text
    error = huge.json()["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert long.status_code == 400 and "session length" in long.json()["error"]["message"]
    # Tokenizing the long prompt takes seconds on this machine; on the event loop it would stop every stream.
    assert during < 0.5 + 2 * baseline, (
        f"longest chunk gap {during:.2f} s while the bodies were sent, {baseline:.2f} s before"
    )


def test_a_chunked_body_over_the_limit_is_413(guarded_server):
    body = _chat_body("x" * (2 * LIMIT))

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    response = httpx.post(
        f"{guarded_server.url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reading whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the server


def test_connections_that_never_finish_a_request_head_are_closed(guarded_server):
    host, port = _address(guarded_server)
    silent = [socket.create_connection((host, port)) for _ in range(20)]
    dripping = [socket.create_connection((host, port)) for _ in range(20)]
    for sock in dripping:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def drip() -> None:
        # One more header line per connection every 0.5 s: a server resetting its timer on each byte never ends them.
        n = 0
        while not stop.wait(0.5):
            n += 1
            for sock in dripping:
                with contextlib.suppress(OSError):
                    sock.sendall(f"X-Drip-{n}: 1\r\n".encode())

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # Meanwhile a normal client is served, on a connection kept alive for longer than the header timeout.
        with httpx.Client(base_url=guarded_server.url, timeout=60) as client:
            assert client.get("/health").status_code == 200
            time.sleep(HEADER_TIMEOUT + 1)
            assert client.get("/health").status_code == 200
        deadline = HEADER_TIMEOUT * 3 + 2
        assert all(_closed_within(sock, deadline) for sock in silent), "a silent connection stayed open"
        assert all(_closed_within(sock, deadline) for sock in dripping), "a dripping connection stayed open"
    finally:
        stop.set()
        dripper.join()
        for sock in silent + dripping:
            sock.close()
    # A request head sent slowly but whole within the timeout is served.
    with socket.create_connection((host, port)) as sock:
        for line in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(HEADER_TIMEOUT / 8)
        sock.settimeout(30)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


# --- SIGTERM ---------------------------------------------------------------------------------------------------------


def _stream_outcome(url: str, started: threading.Event) -> dict:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                return {"status": response.status_code, "body": json.loads(response.read())}
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    started.set()
    except httpx.HTTPError as exc:
        return {"status": 200, "events": events, "transport_error": repr(exc)}
    return {"status": 200, "events": events}


def _plain_outcome(url: str) -> dict:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    except httpx.HTTPError as exc:
        return {"status": None, "transport_error": repr(exc)}
    return {"status": response.status_code, "body": response.json(), "type": response.headers.get("content-type")}


@pytest.mark.slow
def test_sigterm_ends_every_request_properly_and_exits_0(start_server):
    server = start_server(*LIGHT_FLAGS, "--model-name", "smol", "--shutdown-timeout", "3")
    started = threading.Event()
    with ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(_stream_outcome, server.url, started) for _ in range(6)]
        plain = [pool.submit(_plain_outcome, server.url) for _ in range(6)]
        assert started.wait(120), "no stream started"
        time.sleep(1)
        server.process.terminate()
        stream_results = [f.result(timeout=120) for f in streams]
        plain_results = [f.result(timeout=120) for f in plain]
    assert server.process.wait(60) == 0, server.output()

    num_ended = 0
    for result in stream_results:
        assert "transport_error" not in result, result
        if result["status"] != 200:  # not started yet when the server stopped: an OpenAI error body
            assert result["status"] == 503 and result["body"]["error"]["code"] == "server_shutting_down"
            num_ended += 1
            continue
        events = result["events"]
        assert events[-1] == "[DONE]", events[-3:]
        errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e]
        if errors:
            assert errors[0]["code"] == "server_shutting_down" and errors[0]["type"] == "server_error"
            num_ended += 1
    for result in plain_results:
        assert "transport_error" not in result, result
        if result["status"] == 200:
            assert result["body"]["choices"][0]["finish_reason"] == "length"
        else:
            assert result["status"] == 503 and result["type"] == "application/json", result
            assert result["body"]["error"]["code"] == "server_shutting_down"
            num_ended += 1
    # 12 requests of 400 tokens do not finish in 3 s here: the shutdown really ended some of them.
    assert num_ended > 0
