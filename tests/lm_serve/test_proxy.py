"""`lm serve proxy` as a real process in front of real HTTP upstreams.

The upstreams are small OpenAI-shaped servers (STUB_SOURCE, run with uvicorn) whose every answer names the node that
produced it, and whose streams can be held at a gate until the test releases them: that makes routing, buffering and
disconnects observable without timing anything. One test puts the real `lm serve api_server` behind the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-stub-key"
# Upper bound on any wait for a process or a condition; reaching it means the test failed, it never paces a test.
DEADLINE_S = 60.0

STUB_SOURCE = r'''
"""An OpenAI-shaped upstream for the proxy tests: answers name the node; streams may wait at a named gate."""
import argparse, asyncio, json, socket, time
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--api-key", required=True)
args = parser.parse_args()
NAME = args.name
MODELS = ["stub-model", f"{NAME}-only"]
app = FastAPI()
stats = {"started": 0, "finished": 0, "aborted": 0}
gates: dict[str, asyncio.Event] = {}


def gate(name):
    return gates.setdefault(name, asyncio.Event())


def error(status, message):
    body = {"error": {"message": message, "type": "stub_error", "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


@app.get("/health")
async def health():
    return {"status": "ok", "node": NAME}


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": NAME} for m in MODELS]}


@app.get("/stub/stats")
async def get_stats():
    return stats


@app.post("/stub/release/{name}")
async def release(name: str):
    gate(name).set()
    return {"released": name}


@app.post("/v1/completions")
@app.post("/v1/chat/completions")
async def generate(request: Request):
    if request.headers.get("authorization") != f"Bearer {args.api_key}":
        return error(401, f"stub {NAME}: bad api key")
    body = await request.json()
    if body.get("stub_status"):
        return error(body["stub_status"], f"stub {NAME}: failing as asked")
    if body.get("model") not in MODELS:
        return error(404, f"stub {NAME}: no model {body.get('model')!r}")
    chat = request.url.path.endswith("/chat/completions")
    pieces = [f"{NAME}:{i} " for i in range(body.get("max_tokens") or 4)]
    held = body.get("stub_gate")
    stats["started"] += 1
    prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt")).split())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
             "total_tokens": prompt_tokens + len(pieces)}
    common = {"id": "stub-1", "created": int(time.time()), "model": body["model"]}

    def choice(text, finish):
        if chat:
            return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    if not body.get("stream"):
        if held:
            # Starlette does not cancel a handler when its client leaves: poll, as a real server does.
            while not gate(held).is_set():
                if await request.is_disconnected():
                    stats["aborted"] += 1
                    return error(499, "client left")
                await asyncio.sleep(0.02)
        stats["finished"] += 1
        text = "".join(pieces)
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": "length"}]
        obj = "chat.completion" if chat else "text_completion"
        auth = request.headers.get("authorization")
        return {**common, "object": obj, "choices": choices, "usage": usage, "node": NAME, "auth": auth}

    obj = "chat.completion.chunk" if chat else "text_completion"

    async def events():
        try:
            for i, piece in enumerate(pieces):
                if i == 1 and held:
                    await gate(held).wait()
                else:
                    await asyncio.sleep(0.001)
                finish = "length" if i == len(pieces) - 1 else None
                yield f"data: {json.dumps({**common, 'object': obj, 'choices': [choice(piece, finish)]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**common, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            stats["finished"] += 1
        except BaseException:
            stats["aborted"] += 1
            raise

    return StreamingResponse(events(), media_type="text/event-stream")


sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", args.port))
sock.listen(128)
print(f"stub {NAME} listening on port {sock.getsockname()[1]}", flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
'''


# --- processes --------------------------------------------------------------------------------------------------


class Process:
    """A child process whose output is drained by a thread (so it never blocks) and searched for a ready line."""

    def __init__(self, cmd: list[str], ready: str, env: dict | None = None) -> None:
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env or os.environ.copy()
        )
        self._ready = re.compile(ready)
        self._match: re.Match | None = None
        self._event = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._event.wait(DEADLINE_S) or self._match is None:
            self.stop()
            raise RuntimeError(f"{cmd} never printed {ready!r}; its output:\n{self.output}")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._match is None and (match := self._ready.search(line)):
                self._match = match
                self._event.set()
        self._event.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return int(self._match.group("port"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_stub(script: Path, name: str, port: int = 0) -> Process:
    cmd = [sys.executable, str(script), "--name", name, "--port", str(port), "--api-key", API_KEY]
    return Process(cmd, r"listening on port (?P<port>\d+)")


def proxy_command() -> list[str]:
    """`lm serve proxy` through the lm-serve group once it lists the command, else the command itself."""
    import click

    from lm_serve.cli import serve

    if "proxy" in serve.list_commands(click.Context(serve)):
        return [sys.executable, "-c", "from lm_serve.cli import main; main()", "proxy"]
    return [sys.executable, "-c", "from lm_serve.proxy.cli import proxy; proxy.main(prog_name='lm serve proxy')"]


def start_proxy(*args: str) -> Process:
    cmd = [*proxy_command(), "--server-name", "127.0.0.1", "--server-port", "0", *args]
    return Process(cmd, r"lm-serve proxy: ready at http://127\.0\.0\.1:(?P<port>\d+)")


def wait_until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture(scope="module")
def stub_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stub") / "stub_server.py"
    path.write_text(STUB_SOURCE)
    return path


@pytest.fixture(scope="module")
def stubs(stub_script):
    """Two upstream nodes, A and B, shared by the tests that do not kill them."""
    nodes = {name: start_stub(stub_script, name) for name in ("A", "B")}
    yield nodes
    for node in nodes.values():
        node.stop()


@pytest.fixture
def make_proxy():
    started: list[Process] = []

    def make(*args: str) -> Process:
        started.append(start_proxy(*args))
        return started[-1]

    yield make
    for process in started:
        process.stop()


# --- requests -----------------------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat_body(**extra) -> dict:
    return {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}


def served_by(base_url: str, **extra) -> str:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(**extra), headers=AUTH, timeout=DEADLINE_S)
    assert response.status_code == 200, response.text
    return response.json()["node"]


def nodes_of(proxy: Process) -> dict[str, dict]:
    listing = httpx.get(f"{proxy.url}/nodes", timeout=DEADLINE_S).json()
    return {node["url"]: node for node in listing["nodes"]}


def sse_events(lines) -> list[dict | str]:
    """The `data:` payloads of an SSE line stream, parsed, with "[DONE]" as a string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


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

    entry = register_with_proxy(proxy.url, stubs["B"].url + "/")
    assert entry["url"] == stubs["B"].url and entry["healthy"] is True
    assert entry["models"] == ["stub-model", "B-only"]
    assert served_by(proxy.url) == "B"
    added = httpx.post(f"{proxy.url}/nodes/add", json={"url": stubs["A"].url}).json()
    assert added["healthy"] is True
    assert set(nodes_of(proxy)) == {stubs["A"].url, stubs["B"].url}

    assert unregister_from_proxy(proxy.url, stubs["B"].url) is True
    assert {served_by(proxy.url) for _ in range(3)} == {"A"}
    assert unregister_from_proxy(proxy.url, stubs["B"].url) is False  # no longer known: the proxy answers 404
    assert httpx.post(f"{proxy.url}/nodes/remove", json={"url": stubs["B"].url}).status_code == 404
    httpx.post(f"{proxy.url}/nodes/remove", json={"url": stubs["A"].url}).raise_for_status()
    assert httpx.post(url, json=chat_body(), headers=AUTH).status_code == 503

    for bad in [{"url": "localhost:1234"}, {"url": "ftp://x"}, {"link": "http://x:1"}, ["http://x:1"]]:
        refused = httpx.post(f"{proxy.url}/nodes/add", json=bad)
        assert refused.status_code == 400, bad
        assert "url" in refused.json()["error"]["message"]
    with pytest.raises(ProxyRegistrationError, match="cannot register"):
        register_with_proxy(f"http://127.0.0.1:{free_port()}", stubs["A"].url, timeout=5)
    with pytest.raises(ValueError, match="own_url"):
        register_with_proxy(proxy.url, "not a url")


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


def run_in_thread(coroutine_function, *args):
    """Run `coroutine_function(*args)` on its own event loop in a thread; returns (thread, result list)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine_function(*args))), daemon=True)
    thread.start()
    return thread, result


def test_membership_retries_until_the_proxy_comes_up(stubs, make_proxy, caplog):
    from lm_serve.proxy import ProxyMembership, RetryPolicy

    port = free_port()
    # Enough doublings (0.05 s up to ~100 s in all) that the proxy's start-up always fits in the retry window.
    policy = RetryPolicy(num_attempts=12, first_delay=0.05, timeout=DEADLINE_S)
    membership = ProxyMembership(f"http://127.0.0.1:{port}", stubs["A"].url, policy)
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
        assert httpx.post(f"{proxy.url}/nodes/add", json={"url": b.url}).json()["healthy"] is True
        assert {served_by(proxy.url) for _ in range(2)} == {"A", "B"}

        # B dies in the middle of a stream: too late to retry, so the stream ends with an error event.
        body = chat_body(model="B-only", stream=True, stub_gate=uuid.uuid4().hex)
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).count("B:0") == 1
            b.stop(signal.SIGKILL)
            events = sse_events(lines)
        assert len(events) == 1 and "the node serving this stream failed" in events[0]["error"]["message"]
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
    bad_strategy = subprocess.run([*proxy_command(), "--routing-strategy", "random"], capture_output=True, text=True)
    # The lm command groups print choices with '-' (their flags accept '-' or '_').
    assert bad_strategy.returncode == 2 and re.search("least[-_]load", bad_strategy.stderr)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
def test_real_api_server_registers_itself_with_proxy_url(request, make_proxy):
    openai = pytest.importorskip("openai")
    assert "--proxy-url" in api_server_options()
    proxy = make_proxy()
    # Listening on the wildcard with port 0: the server must advertise an address and the port the system chose.
    server = request.getfixturevalue("start_server")(
        *("--server-name", "0.0.0.0", "--session-len", "512", "--num-kv-blocks", "32", "--max-batch-size", "4"),
        *("--num-threads", "1", "--proxy-url", proxy.url),
    )
    listed = wait_until(lambda: [n for n in nodes_of(proxy).values() if n["healthy"]], "the server registers")
    # The proxy is on loopback, so the address that routes to it is 127.0.0.1 (the ready line shows the same).
    assert [node["url"] for node in listed] == [server.url]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url) and not server.url.endswith(":0")
    # The proxy lists the node before its answer to the registration reaches the server, which then prints this.
    line = f"registered with the proxy at {proxy.url} as {server.url} (healthy)"
    wait_until(lambda: line in server.output(), "the server reports its registration")

    through = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0, timeout=300)
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    model = direct.models.list().data[0].id
    # By the time the proxy answered the registration, it had also learnt the node's models.
    assert nodes_of(proxy)[server.url]["models"] == [model]
    ask = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    answer = through.chat.completions.create(**ask)
    expected = direct.chat.completions.create(**ask)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage.completion_tokens == expected.usage.completion_tokens > 0
    assert nodes_of(proxy)[server.url]["num_requests"] == 1

    server.stop()  # SIGTERM: a graceful shutdown unregisters the node before the process ends
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
