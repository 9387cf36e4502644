"""A node that stops answering (SIGSTOP: it still accepts connections, the kernel queues them, nothing answers).

Requests not yet answered fail over to a healthy node, streams already answering end with an error event and
`[DONE]`, and nothing waits longer than the proxy's timeouts; the node is resumed (SIGCONT) and stopped at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import time
import uuid

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
# Loaded after the skips above: the harness imports httpx and runs uvicorn.
h = importlib.import_module("tests.lm_serve.proxy_harness")


stub_script, make_proxy = h.stub_script, h.make_proxy
# Far above every bound the proxy is configured with below, far below a hang: a client that waits this long failed.
CLIENT_TIMEOUT_S = 20.0


@contextlib.contextmanager
def stopped(node):
    """`node`'s process stopped (SIGSTOP) for the block, then resumed."""
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)


def ask(proxy, **extra) -> httpx.Response:
    body = h.chat_body(**extra)
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=h.AUTH, timeout=CLIENT_TIMEOUT_S)


def open_stream_on_b(proxy):
    """A stream answered by B and held there after its first chunk: (response, line iterator)."""
    body = h.chat_body(model="B-only", stream=True, stub_gate=uuid.uuid4().hex)
    client = httpx.Client(timeout=CLIENT_TIMEOUT_S)
    request = client.build_request("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=h.AUTH)
    response = client.send(request, stream=True)
    lines = response.iter_lines()
    assert "B:0" in next(line for line in lines if line.startswith("data: "))
    return response, lines


def assert_ends_with_error_event(lines) -> None:
    events = h.sse_events(lines)
    assert events[-1] == "[DONE]", events
    assert "the node serving this stream failed" in events[-2]["error"]["message"], events


@pytest.mark.slow
def test_a_stalled_node_is_failed_over_by_its_health_check(stub_script, make_proxy):
    a, b = h.start_stub(stub_script, "A"), h.start_stub(stub_script, "B")
    try:
        # A read timeout far beyond the test: only the health check can find B stalled.
        proxy_args = ("--health-interval", "1", "--health-timeout", "3")
        proxy = make_proxy(a.url, b.url, "--routing-strategy", "round_robin", "--read-timeout", "600", *proxy_args)
        assert {ask(proxy).json()["node"] for _ in range(2)} == {"A", "B"}
        response, lines = open_stream_on_b(proxy)
        with stopped(b):
            started = time.monotonic()
            # Round robin sends every other request to B, which accepts and says nothing: each fails over to A.
            answers = [ask(proxy) for _ in range(4)]
            assert [answer.json()["node"] for answer in answers] == ["A"] * 4
            assert_ends_with_error_event(lines)
            elapsed = time.monotonic() - started
            response.close()
            entry = h.nodes_of(proxy)[b.url]
            assert entry["healthy"] is False and "no answer within 3 s" in entry["last_error"]
        # A health interval and timeout, twice at most: nowhere near CLIENT_TIMEOUT_S.
        assert elapsed < 15, elapsed
        h.wait_until(lambda: h.nodes_of(proxy)[b.url]["healthy"], "B is healthy again once resumed")
        assert {ask(proxy).json()["node"] for _ in range(2)} == {"A", "B"}
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_a_stalled_node_is_failed_over_by_the_read_timeout(stub_script, make_proxy):
    a, b = h.start_stub(stub_script, "A"), h.start_stub(stub_script, "B")
    try:
        # No health check during the test: only the read timeout can find B stalled.
        proxy_args = ("--health-interval", "3600", "--health-timeout", "2", "--read-timeout", "3")
        proxy = make_proxy(a.url, b.url, "--routing-strategy", "round_robin", *proxy_args)
        only_b = make_proxy(b.url, *proxy_args)
        response, lines = open_stream_on_b(proxy)
        with stopped(b):
            started = time.monotonic()
            # The merged model list leaves out the node that does not answer in time rather than wait for it.
            listed = httpx.get(f"{proxy.url}/v1/models", headers=h.AUTH, timeout=CLIENT_TIMEOUT_S)
            assert sorted(model["id"] for model in listed.json()["data"]) == ["A-only", "stub-model"]
            answers = [ask(proxy) for _ in range(3)]
            assert [answer.json()["node"] for answer in answers] == ["A"] * 3
            assert_ends_with_error_event(lines)
            response.close()
            entry = h.nodes_of(proxy)[b.url]
            assert entry["healthy"] is False and "ReadTimeout" in entry["last_error"]
            # With no other node, the client gets a 503 naming the timeout, not a hang.
            alone = ask(only_b)
            assert alone.status_code == 503 and "ReadTimeout" in alone.json()["error"]["message"]
            assert time.monotonic() - started < 15
    finally:
        a.stop()
        b.stop()
