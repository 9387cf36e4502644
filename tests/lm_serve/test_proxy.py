"""`lm serve proxy` as a real process in front of real HTTP upstreams (the stub nodes of proxy_harness.py).

One test puts the real `lm serve api_server` behind the proxy; others have it register itself.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
# Loaded after the skips above: the harness imports httpx and runs uvicorn.
harness = importlib.import_module("tests.lm_serve.proxy_harness")


ROOT, API_KEY, ADMIN_KEY, DEADLINE_S = harness.ROOT, harness.API_KEY, harness.ADMIN_KEY, harness.DEADLINE_S
AUTH, ADMIN = harness.AUTH, harness.ADMIN
Process, start_stub, proxy_command, wait_until = (
    harness.Process,
    harness.start_stub,
    harness.proxy_command,
    harness.wait_until,
)
chat_body, served_by, nodes_of, sse_events = harness.chat_body, harness.served_by, harness.nodes_of, harness.sse_events
free_port, run_in_thread = harness.free_port, harness.run_in_thread
# Fixtures: stub_script and stubs (two nodes A and B for the module), make_proxy.
stub_script, stubs, make_proxy = harness.stub_script, harness.stubs, harness.make_proxy


# --- routing ------------------------------------------------------------------------------------------------------


def test_round_robin_alternates_between_nodes(stubs, make_proxy):
    proxy = make_proxy("--nodes", f"{stubs['A'].url},{stubs['B'].url}", "--routing-strategy", "round_robin")
    served = [served_by(proxy.url) for _ in range(6)]
    assert set(served) == {"A", "B"}
    assert all(served[i] != served[i + 1] for i in range(5)), served


def test_least_load_sends_requests_to_the_idle_node(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, stubs["B"].url, "--routing-strategy", "least_load")
    gate = uuid.uuid4().hex
    body = chat_body(stream=True, stub_gate=gate)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH, timeout=DEADLINE_S) as held:
        lines = held.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        busy = json.loads(first[len("data: ") :])["choices"][0]["delta"]["content"].split(":")[0]
        idle = "B" if busy == "A" else "A"
        # One request in flight on `busy`: every new request goes to the idle node, one after another.
        assert [served_by(proxy.url) for _ in range(3)] == [idle] * 3
        loads = {url: node["in_flight"] for url, node in nodes_of(proxy).items()}
        assert loads == {stubs[busy].url: 1, stubs[idle].url: 0}
        httpx.post(f"{stubs[busy].url}/stub/release/{gate}", timeout=DEADLINE_S)
        assert sse_events(lines)[-1] == "[DONE]"
    wait_until(lambda: all(n["in_flight"] == 0 for n in nodes_of(proxy).values()), "the held stream is released")


def test_model_aware_routing_and_merged_model_list(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, stubs["B"].url)
    listed = httpx.get(f"{proxy.url}/v1/models", headers=AUTH, timeout=DEADLINE_S).json()
    assert listed["object"] == "list"
    assert sorted(entry["id"] for entry in listed["data"]) == ["A-only", "B-only", "stub-model"]
    # Only B serves "B-only": every request for it goes there, whatever the load order says.
    assert {served_by(proxy.url, model="B-only") for _ in range(4)} == {"B"}
    # A model no node lists still reaches a node, which answers with its own error.
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json=chat_body(model="nope"), headers=AUTH, timeout=DEADLINE_S
    )
    assert response.status_code == 404
    assert "no model 'nope'" in response.json()["error"]["message"]


# --- relaying -----------------------------------------------------------------------------------------------------


def test_streams_are_relayed_as_they_arrive(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, stubs["B"].url)
    gate = uuid.uuid4().hex
    body = chat_body(stream=True, stub_gate=gate, max_tokens=4, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH, timeout=DEADLINE_S) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        # The node holds its stream after the first chunk until released: reading that chunk through the proxy can
        # only succeed if the proxy relays without waiting for the node to finish.
        first = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: ") :])
        node = first["choices"][0]["delta"]["content"].split(":")[0]
        assert first["choices"][0]["delta"]["content"] == f"{node}:0 "
        stats = httpx.get(f"{stubs[node].url}/stub/stats", timeout=DEADLINE_S).json()
        assert stats["started"] > stats["finished"]
        httpx.post(f"{stubs[node].url}/stub/release/{gate}", timeout=DEADLINE_S)
        rest = sse_events(lines)
    assert [event["choices"][0]["delta"]["content"] for event in rest[:3]] == [f"{node}:{i} " for i in (1, 2, 3)]
    assert rest[3]["usage"]["completion_tokens"] == 4
    assert rest[4] == "[DONE]"


def test_status_codes_error_bodies_and_authorization_pass_through(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url)
    url = f"{proxy.url}/v1/chat/completions"
    answer = httpx.post(url, json=chat_body(), headers=AUTH, timeout=DEADLINE_S).json()
    assert answer["auth"] == f"Bearer {API_KEY}"
    # The node's own refusals, byte for byte.
    for headers, body in [({"Authorization": "Bearer wrong"}, chat_body()), (AUTH, chat_body(stub_status=400))]:
        direct = httpx.post(f"{stubs['A'].url}/v1/chat/completions", json=body, headers=headers, timeout=DEADLINE_S)
        proxied = httpx.post(url, json=body, headers=headers, timeout=DEADLINE_S)
        assert proxied.status_code == direct.status_code
        assert proxied.status_code in (400, 401)
        assert proxied.content == direct.content
    # Non-JSON bodies and other routes are relayed too (the node answers them, here with FastAPI's 404 / 422).
    assert httpx.get(f"{proxy.url}/v1/nothing-here", timeout=DEADLINE_S).status_code == 404


def test_openai_client_through_the_proxy(stubs, make_proxy):
    openai = pytest.importorskip("openai")
    proxy = make_proxy(stubs["A"].url, stubs["B"].url)
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="stub-model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    node = text[0]
    assert text == "".join(f"{node}:{i} " for i in range(5))
    assert chunks[-1].usage.completion_tokens == 5
    completion = client.completions.create(model="stub-model", prompt="hi", max_tokens=2)
    assert completion.choices[0].text in ("A:0 A:1 ", "B:0 B:1 ")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="stub-model", prompt="hi", max_tokens=2
        )


def test_64_concurrent_streams_all_complete(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, stubs["B"].url)

    async def one(client: httpx.AsyncClient) -> tuple[str, int]:
        body = chat_body(stream=True, max_tokens=8)
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        texts = [event["choices"][0]["delta"]["content"] for event in events[:-1]]
        return texts[0].split(":")[0], len(texts)

    async def main():
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=DEADLINE_S, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(64)))

    results = asyncio.run(main())
    assert [count for _, count in results] == [8] * 64
    assert {node for node, _ in results} == {"A", "B"}
    wait_until(lambda: all(n["in_flight"] == 0 for n in nodes_of(proxy).values()), "every stream is accounted for")


def test_client_disconnect_closes_the_upstream_request(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url)
    stats_url = f"{stubs['A'].url}/stub/stats"
    before = httpx.get(stats_url, timeout=DEADLINE_S).json()["aborted"]
    # A stream left after its first chunk...
    body = chat_body(stream=True, stub_gate=uuid.uuid4().hex)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH, timeout=DEADLINE_S) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    wait_until(lambda: httpx.get(stats_url).json()["aborted"] == before + 1, "the node aborts the stream")
    # ...and a non-streamed request left before its answer: the proxy must not wait for the node's headers.
    body = chat_body(stub_gate=uuid.uuid4().hex)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH, timeout=1.0)
    wait_until(lambda: httpx.get(stats_url).json()["aborted"] == before + 2, "the node aborts the request")
    wait_until(lambda: nodes_of(proxy)[stubs["A"].url]["in_flight"] == 0, "the proxy releases the node")


# --- nodes: registration, failures, health ------------------------------------------------------------------------


def test_registration_and_removal(stubs, make_proxy):
    from lm_serve.proxy import ProxyRegistrationError, register_with_proxy, unregister_from_proxy

    proxy = make_proxy()
    url = f"{proxy.url}/v1/chat/completions"
    assert httpx.get(f"{proxy.url}/health").json() == {"status": "ok", "num_nodes": 0, "num_healthy_nodes": 0}
    assert httpx.post(url, json=chat_body(), headers=AUTH).status_code == 503

    entry = register_with_proxy(proxy.url, stubs["B"].url + "/", admin_key=ADMIN_KEY)
    assert entry["url"] == stubs["B"].url and entry["healthy"] is True
    assert entry["models"] == ["stub-model", "B-only"]
    assert served_by(proxy.url) == "B"
    added = httpx.post(f"{proxy.url}/nodes/add", json={"url": stubs["A"].url}, headers=ADMIN).json()
    assert added["healthy"] is True
    assert set(nodes_of(proxy)) == {stubs["A"].url, stubs["B"].url}

    assert unregister_from_proxy(proxy.url, stubs["B"].url, admin_key=ADMIN_KEY) is True
    assert {served_by(proxy.url) for _ in range(3)} == {"A"}
    assert unregister_from_proxy(proxy.url, stubs["B"].url, admin_key=ADMIN_KEY) is False  # unknown now: 404
    assert httpx.post(f"{proxy.url}/nodes/remove", json={"url": stubs["B"].url}, headers=ADMIN).status_code == 404
    httpx.post(f"{proxy.url}/nodes/remove", json={"url": stubs["A"].url}, headers=ADMIN).raise_for_status()
    assert httpx.post(url, json=chat_body(), headers=AUTH).status_code == 503

    for bad in [{"url": "localhost:1234"}, {"url": "ftp://x"}, {"link": "http://x:1"}, ["http://x:1"]]:
        refused = httpx.post(f"{proxy.url}/nodes/add", json=bad, headers=ADMIN)
        assert refused.status_code == 400, bad
        assert "url" in refused.json()["error"]["message"]
    with pytest.raises(ProxyRegistrationError, match="cannot register"):
        register_with_proxy(f"http://127.0.0.1:{free_port()}", stubs["A"].url, timeout=5)
    with pytest.raises(ValueError, match="own_url"):
        register_with_proxy(proxy.url, "not a url", admin_key=ADMIN_KEY)


def test_advertised_url_for_each_listening_address():
    from lm_serve.proxy import advertised_url

    v4, v6 = socket.AF_INET, socket.AF_INET6
    # A named listening address is what the proxy connects to, port as bound.
    assert advertised_url("10.1.2.3", {v4: 5000}, "http://10.9.9.9:8000") == "http://10.1.2.3:5000"
    assert advertised_url("node-7.internal", {v4: 5000}, "http://10.9.9.9:8000") == "http://node-7.internal:5000"
    assert advertised_url("::1", {v6: 5000}, "http://[::1]:8000") == "http://[::1]:5000"
    # A wildcard with the proxy on this host (0.0.0.0 in a proxy URL reaches this host too): the loopback address of
    # the family the server listens on ("::" listens on IPv6 only).
    for proxy_url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://0.0.0.0:8000", "http://[::1]:8000"):
        assert advertised_url("0.0.0.0", {v4: 5000}, proxy_url) == "http://127.0.0.1:5000"
        assert advertised_url("::", {v6: 5001}, proxy_url) == "http://[::1]:5001"
    assert advertised_url("", {v4: 5000, v6: 5001}, "http://127.0.0.1:8000") == "http://127.0.0.1:5000"
    with pytest.raises(ValueError, match="proxy_url"):
        advertised_url("0.0.0.0", {v4: 5000}, "localhost:8000")


def test_advertised_url_for_a_remote_proxy_is_the_address_that_routes_to_it():
    from lm_serve.proxy import advertised_url

    remote = "192.0.2.77"  # TEST-NET-1: never answers, but the routing table may still name a source address for it
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((remote, 9))
    except OSError:
        pytest.skip("this host has no route to an outside IPv4 address")
    url = advertised_url("0.0.0.0", {socket.AF_INET: 5000}, f"http://{remote}:8000")
    host = re.fullmatch(r"http://([\d.]+):5000", url).group(1)
    # Independent check: binding to an address succeeds only if it is one of this host's own.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
        own.bind((host, 0))
    assert not host.startswith("127.") and host != "0.0.0.0"


def test_membership_retries_until_the_proxy_comes_up(stubs, make_proxy, caplog):
    from lm_serve.proxy import ProxyMembership, RetryPolicy

    port = free_port()
    # Enough doublings (0.05 s up to ~100 s in all) that the proxy's start-up always fits in the retry window.
    policy = RetryPolicy(num_attempts=12, first_delay=0.05, timeout=DEADLINE_S)
    membership = ProxyMembership(f"http://127.0.0.1:{port}", stubs["A"].url, policy, admin_key=ADMIN_KEY)
    caplog.set_level("INFO", logger="lm_serve.proxy")
    thread, joined = run_in_thread(membership.join)
    wait_until(lambda: any("retrying in" in r.getMessage() for r in caplog.records), "a first attempt fails")
    proxy = make_proxy("--server-port", str(port))
    thread.join(DEADLINE_S * 2)
    assert joined == [True] and membership.is_registered
    assert nodes_of(proxy)[stubs["A"].url]["healthy"] is True

    left, removed = run_in_thread(membership.leave)
    left.join(DEADLINE_S)
    assert removed == [True] and nodes_of(proxy) == {}


def test_membership_gives_up_at_once_on_a_refusal_and_leaving_a_dead_proxy_is_quiet(stubs, caplog):
    from lm_serve.proxy import ProxyMembership, RetryPolicy

    # The stub is no proxy: POST /nodes/add answers 404, which asking again will not change.
    membership = ProxyMembership(stubs["B"].url, stubs["A"].url, RetryPolicy(num_attempts=5, first_delay=30))
    caplog.set_level("INFO", logger="lm_serve.proxy")
    thread, joined = run_in_thread(membership.join)
    thread.join(DEADLINE_S)
    assert joined == [False] and not membership.is_registered
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1 and "refused the registration (404)" in messages[0]
    assert "(attempt 1 of 5). Serving anyway" in messages[0]

    # Leaving a proxy that never took us sends nothing; leaving a dead one is bounded and returns False.
    left, removed = run_in_thread(membership.leave)
    left.join(DEADLINE_S)
    assert removed == [False]
    dead = ProxyMembership(f"http://127.0.0.1:{free_port()}", stubs["A"].url, RetryPolicy(leave_timeout=2))
    dead.is_registered = True
    left, removed = run_in_thread(dead.leave)
    left.join(DEADLINE_S)
    assert removed == [False]
    with pytest.raises(ValueError, match="num_attempts"):
        RetryPolicy(num_attempts=0)
    with pytest.raises(ValueError, match="own_url"):
        ProxyMembership(stubs["B"].url, "0.0.0.0:80")


def test_no_healthy_node_is_503_in_openai_shape(make_proxy):
    proxy = make_proxy("--nodes", f"http://127.0.0.1:{free_port()}")
    response = httpx.post(f"{proxy.url}/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == 503
    assert "0 of 1 nodes healthy" in error["message"]
    assert httpx.get(f"{proxy.url}/v1/models").status_code == 503
    assert httpx.get(f"{proxy.url}/health").json()["num_healthy_nodes"] == 0


def test_a_node_that_dies_is_retried_around_then_returns(stub_script, make_proxy):
    a, b = start_stub(stub_script, "A"), start_stub(stub_script, "B")
    try:
        # Health checks far apart: only the failed request itself can reveal that B died.
        proxy = make_proxy(a.url, b.url, "--routing-strategy", "round_robin", "--health-interval", "3600")
        assert {served_by(proxy.url) for _ in range(2)} == {"A", "B"}
        b.stop(signal.SIGKILL)
        # Round robin sends one of these to B: its connection is refused, and the request is retried on A.
        assert [served_by(proxy.url) for _ in range(4)] == ["A"] * 4
        dead = nodes_of(proxy)[b.url]
        assert dead["healthy"] is False and dead["num_failures"] == 1
        assert "ConnectError" in dead["last_error"]
        b = start_stub(stub_script, "B", port=b.port)
        # Adding a known node again re-checks it at once.
        assert httpx.post(f"{proxy.url}/nodes/add", json={"url": b.url}, headers=ADMIN).json()["healthy"] is True
        assert {served_by(proxy.url) for _ in range(2)} == {"A", "B"}

        # B dies in the middle of a stream: too late to retry, so the stream ends with an error event.
        body = chat_body(model="B-only", stream=True, stub_gate=uuid.uuid4().hex)
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).count("B:0") == 1
            b.stop(signal.SIGKILL)
            events = sse_events(lines)
        assert len(events) == 2 and "the node serving this stream failed" in events[0]["error"]["message"]
        assert events[1] == "[DONE]"
        assert nodes_of(proxy)[b.url]["healthy"] is False
    finally:
        a.stop()
        b.stop()


def test_health_checks_skip_a_dead_node_and_bring_it_back(stub_script, make_proxy):
    a, b = start_stub(stub_script, "A"), start_stub(stub_script, "B")
    try:
        proxy = make_proxy(a.url, b.url, "--routing-strategy", "round_robin", "--health-interval", "0.2")
        b.stop(signal.SIGKILL)
        wait_until(lambda: not nodes_of(proxy)[b.url]["healthy"], "a health check finds B dead")
        assert "GET /health failed" in nodes_of(proxy)[b.url]["last_error"]
        assert nodes_of(proxy)[b.url]["num_failures"] == 0  # found by the check, not by a failed request
        assert [served_by(proxy.url) for _ in range(3)] == ["A"] * 3
        b = start_stub(stub_script, "B", port=b.port)
        wait_until(lambda: nodes_of(proxy)[b.url]["healthy"], "a health check finds B back")
        assert {served_by(proxy.url) for _ in range(2)} == {"A", "B"}
    finally:
        a.stop()
        b.stop()


def test_serving_benchmark_through_the_proxy(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, stubs["B"].url)
    script = ROOT / "benchmarks" / "serving.py"
    pairs = json.loads((ROOT / "benchmarks" / "data" / "sharegpt_lengths_1000.json").read_text())["pairs"]
    common = [sys.executable, str(script), "--base-url", f"{proxy.url}/v1", "--num-prompts", "24"]
    common += ["--max-output-len", "6", "--disable-tqdm"]

    def bench(*args: str) -> tuple[int, dict]:
        done = subprocess.run([*common, *args], capture_output=True, text=True, timeout=DEADLINE_S, cwd=ROOT)
        return done.returncode, json.loads(done.stdout)

    code, result = bench("--api-key", API_KEY, "--model", "stub-model", "--max-concurrency", "8")
    assert code == 0, result
    assert (result["completed"], result["failed"], result["num_short_outputs"]) == (24, 0, 0)
    # The stub generates exactly max_tokens pieces and reports them as usage.
    assert result["total_output_tokens"] == sum(min(out, 6) for _, out in pairs[:24])
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(result[metric]) == {"mean", "p50", "p99"}
        assert 0 < result[metric]["p50"] <= result[metric]["p99"]

    # Poisson arrivals on the completions endpoint, the model read from the proxy's merged /v1/models.
    code, result = bench("--api-key", API_KEY, "--endpoint", "completions", "--request-rate", "100")
    assert code == 0, result
    assert (result["model"], result["completed"], result["request_rate"]) == ("stub-model", 24, 100.0)

    code, result = bench("--api-key", "wrong", "--model", "stub-model")
    assert code == 1
    assert result["failed"] == 24 and result["errors"][0].startswith("HTTP 401")


def test_cli_rejects_bad_arguments():
    bad_url = subprocess.run([*proxy_command(), "--nodes", "localhost:1"], capture_output=True, text=True)
    assert bad_url.returncode == 2 and "nodes: expected a URL" in bad_url.stderr
    bad_strategy = subprocess.run([*proxy_command(), "--routing-strategy", "fastest"], capture_output=True, text=True)
    assert bad_strategy.returncode == 2 and "expected one of least_load, round_robin, random" in bad_strategy.stderr


# --- the real api_server behind the proxy -------------------------------------------------------------------------


def api_server_options() -> set[str] | None:
    """The option names of `lm serve api-server`, or None while the command does not exist."""
    import click

    from lm_serve.cli import serve

    context = click.Context(serve)
    command = next((serve.get_command(context, n) for n in ("api-server", "api_server")), None)
    if command is None:
        return None
    return {option for param in command.params for option in getattr(param, "opts", [])}


@pytest.mark.slow
def test_real_api_server_behind_the_proxy(request, make_proxy):
    openai = pytest.importorskip("openai")
    if api_server_options() is None:
        pytest.skip("`lm serve api-server` does not exist yet")
    server, api_key = request.getfixturevalue("api_server"), request.getfixturevalue("api_key")
    proxy = make_proxy("--nodes", server.url)
    through = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=api_key, max_retries=0, timeout=300)
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=300)

    assert [m.id for m in through.models.list().data] == [m.id for m in direct.models.list().data]
    model = direct.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three colours."}]
    ask = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0}
    expected = direct.chat.completions.create(**ask)
    answer = through.chat.completions.create(**ask)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage.completion_tokens == expected.usage.completion_tokens

    chunks = list(through.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == expected.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens

    prompt = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    assert through.completions.create(**prompt).choices[0].text == direct.completions.create(**prompt).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="wrong", max_retries=0).completions.create(**prompt)

    # A client leaving a long stream through the proxy: the server aborts the generation.
    scrape = request.getfixturevalue("scrape")
    aborts = 'lm_requests_finished_total{finish_reason="abort"}'
    before = scrape(server).get(aborts, 0)
    stream = through.chat.completions.create(**{**ask, "max_tokens": 400}, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    assert all(next(chunks) for _ in range(3))  # the role chunk and two pieces of text
    stream.close()
    wait_until(lambda: scrape(server).get(aborts, 0) == before + 1, "the server aborts the abandoned stream")


@pytest.mark.slow
def test_real_api_server_registers_itself_with_the_admin_key_and_a_stalled_one_fails_fast(request, make_proxy):
    openai = pytest.importorskip("openai")
    assert {"--proxy-url", "--proxy-admin-key"} <= api_server_options()
    client_key = "sk-shared-client-key"
    # The proxy and the server share the client key; only the server knows the proxy's admin key.
    proxy = make_proxy("--api-keys", client_key, "--health-interval", "1", "--health-timeout", "8")
    # Listening on the wildcard with port 0: the server must advertise an address and the port the system chose.
    server = request.getfixturevalue("start_server")(
        *("--server-name", "0.0.0.0", "--session-len", "512", "--num-kv-blocks", "32", "--max-batch-size", "4"),
        *("--num-threads", "1", "--api-keys", client_key),
        *("--proxy-url", proxy.url, "--proxy-admin-key", ADMIN_KEY),
    )
    listed = wait_until(lambda: [n for n in nodes_of(proxy).values() if n["healthy"]], "the server registers")
    # The proxy is on loopback, so the address that routes to it is 127.0.0.1 (the ready line shows the same).
    assert [node["url"] for node in listed] == [server.url]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url) and not server.url.endswith(":0")
    # The proxy lists the node before its answer to the registration reaches the server, which then prints this.
    line = f"registered with the proxy at {proxy.url} as {server.url} (healthy)"
    wait_until(lambda: line in server.output(), "the server reports its registration")

    through = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=client_key, max_retries=0, timeout=300)
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key=client_key, max_retries=0, timeout=300)
    model = direct.models.list().data[0].id
    # The proxy asked the node's models with its client key as it registered the node.
    assert nodes_of(proxy)[server.url]["models"] == [model]
    ask = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    answer = through.chat.completions.create(**ask)
    expected = direct.chat.completions.create(**ask)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage.completion_tokens == expected.usage.completion_tokens > 0
    keyless = httpx.post(f"{proxy.url}/v1/chat/completions", json=ask, timeout=DEADLINE_S)
    assert keyless.status_code == 401 and "Missing API key" in keyless.json()["error"]["message"]
    assert nodes_of(proxy)[server.url]["num_requests"] == 1  # the keyless request never reached the node

    # The server wedges (SIGSTOP) mid-stream: the stream ends with an error event and [DONE] instead of hanging, and
    # the next request is refused at once since no healthy node is left.
    stream = through.chat.completions.create(**{**ask, "max_tokens": 400}, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    try:
        assert all(next(chunks) for _ in range(3))
        os.kill(server.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="the node serving this stream failed"):
            for _ in chunks:
                pass
        assert time.monotonic() - started < 30  # at most a health interval plus two health timeouts
        assert not nodes_of(proxy)[server.url]["healthy"]
        with pytest.raises(openai.InternalServerError, match="no healthy node"):
            through.chat.completions.create(**ask)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    wait_until(lambda: nodes_of(proxy)[server.url]["healthy"], "the resumed server is healthy again")
    assert through.chat.completions.create(**ask).choices[0].message.content == expected.choices[0].message.content

    server.stop()  # SIGTERM: a graceful shutdown unregisters the node (with the admin key) before the process ends
    assert server.process.returncode is not None
    assert nodes_of(proxy) == {}


@pytest.mark.slow
def test_api_server_keeps_serving_when_the_proxy_cannot_be_reached(request):
    openai = pytest.importorskip("openai")
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    server = request.getfixturevalue("start_server")(
        *("--session-len", "256", "--num-kv-blocks", "16", "--max-batch-size", "2", "--num-threads", "1"),
        *("--proxy-url", dead_proxy),
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    ask = {"model": client.models.list().data[0].id, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    assert client.completions.create(**ask).usage.completion_tokens == 2
    # The retries end in one warning that says what failed and that the server goes on without the proxy.
    warning = wait_until(
        lambda: re.search(
            r"cannot register with the proxy at (\S+): .*\(attempt 5 of 5\)\. Serving anyway", server.output()
        ),
        "the server gives up registering",
    )
    assert warning.group(1) == dead_proxy
    assert server.process.poll() is None
    assert client.completions.create(**ask).usage.completion_tokens == 2
    server.stop()


def test_api_server_rejects_a_malformed_proxy_url_before_loading_the_model():
    cmd = [sys.executable, "-m", "lm_serve", "api-server", "--proxy-url", "localhost:8000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 1 and "proxy_url: expected a URL like http://HOST:PORT" in done.stderr
