"""Shared by the proxy tests, which import it as `tests.lm_serve.proxy_harness` (under `--import-mode=importlib` pytest
registers `tests` and `tests.lm_serve` as packages of the rootdir).

The upstreams are small OpenAI-shaped servers (STUB_SOURCE, run with uvicorn) whose every answer names the node that
produced it, and whose streams can be held at a gate until the test releases them: that makes routing, buffering and
disconnects observable without timing anything. Proxies are started as `lm serve proxy` processes with ADMIN_KEY as
their admin key unless a test says otherwise.
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
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-stub-key"
ADMIN_KEY = "sk-proxy-admin"
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


def start_proxy(*args: str, admin_key: str | None = ADMIN_KEY, env: dict | None = None) -> Process:
    """A proxy on a free loopback port, with `admin_key` (None: none) and `env` over a copy of os.environ that lacks
    the proxy's key variables."""
    environ = {k: v for k, v in os.environ.items() if k not in ("LM_API_KEYS", "LM_PROXY_ADMIN_KEY")}
    environ.update(env or {})
    cmd = [*proxy_command(), "--server-name", "127.0.0.1", "--server-port", "0", *args]
    cmd += ["--admin-key", admin_key] if admin_key else []
    return Process(cmd, r"lm-serve proxy: ready at http://127\.0\.0\.1:(?P<port>\d+)", env=environ)


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

    def make(*args: str, admin_key: str | None = ADMIN_KEY, env: dict | None = None) -> Process:
        started.append(start_proxy(*args, admin_key=admin_key, env=env))
        return started[-1]

    yield make
    for process in started:
        process.stop()


# --- requests -----------------------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chat_body(**extra) -> dict:
    return {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}


def served_by(base_url: str, **extra) -> str:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(**extra), headers=AUTH, timeout=DEADLINE_S)
    assert response.status_code == 200, response.text
    return response.json()["node"]


def nodes_of(proxy: Process) -> dict[str, dict]:
    listing = httpx.get(f"{proxy.url}/nodes", headers=ADMIN, timeout=DEADLINE_S).json()
    return {node["url"]: node for node in listing["nodes"]}


def sse_events(lines) -> list[dict | str]:
    """The `data:` payloads of an SSE line stream, parsed, with "[DONE]" as a string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_thread(coroutine_function, *args):
    """Run `coroutine_function(*args)` on its own event loop in a thread; returns (thread, result list)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine_function(*args))), daemon=True)
    thread.start()
    return thread, result
