"""Real servers for the lm-serve tests: `python -m lm_serve api-server` subprocesses on loopback, default model.

One server is shared by the whole session (`api_server`); tests that need other flags start their own with
`start_server`. Servers are started with `--server-port 0` and report the port they got in their ready line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

API_KEY = "test-key-1"
SECOND_KEY = "test-key-2"
READY_PREFIX = "lm-serve: ready at "
# Small enough to start fast on a 2-core CPU; the KV cache holds two full sessions.
# One torch thread: this machine's cores are shared, and a 2-thread OpenMP team that must wait for a busy core is
# several times slower than one thread.
LIGHT_FLAGS = ["--session-len", "512", "--num-kv-blocks", "64", "--max-batch-size", "16", "--num-threads", "1"]


class ServerProcess:
    """A server subprocess; `url` once ready, `output()` for diagnostics, `stop()` to end it."""

    def __init__(self, model_dir: Path, *flags: str, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        import lm_serve

        src = str(Path(lm_serve.__file__).resolve().parents[1])
        environ = {**os.environ, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, environ.get("PYTHONPATH")) if p)
        environ.setdefault("PYTHONUNBUFFERED", "1")
        command = [sys.executable, "-m", "lm_serve", "api-server", str(model_dir)]
        command += ["--server-name", "127.0.0.1", "--server-port", "0", "--log-level", "warning", *flags]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ
        )
        self._lines: list[str] = []
        self._ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.output()}")

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.append(line)
            if line.startswith(READY_PREFIX) and self.url is None:
                self.url = line[len(READY_PREFIX) :].strip()
                self._ready.set()

    def output(self) -> str:
        return "".join(self._lines[-200:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def start_server(default_model_dir):
    """`start_server(*flags)` -> a ready `ServerProcess` on the default model, stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(default_model_dir, *flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server_process() -> type[ServerProcess]:
    """The `ServerProcess` class, for test modules that start a server on another model (they cannot import
    conftest); such a module stops its servers itself."""
    return ServerProcess


@pytest.fixture(scope="session")
def light_flags() -> list[str]:
    """`LIGHT_FLAGS`, for test modules that start their own server (they cannot import conftest)."""
    return list(LIGHT_FLAGS)


@pytest.fixture(scope="session")
def api_server(start_server) -> ServerProcess:
    """The shared server: API keys required, Hermes tool calls and <think> reasoning parsed, light engine settings."""
    return start_server(
        *LIGHT_FLAGS,
        "--api-keys",
        API_KEY,
        SECOND_KEY,
        "--model-name",
        "smol",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
    )


@pytest.fixture(scope="session")
def client(api_server):
    """The official openai client on the shared server (no retries, so errors surface as they are)."""
    import openai

    return openai.OpenAI(base_url=f"{api_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(api_server):
    """A plain httpx client with the API key, for what the openai client cannot send (bad JSON, other routes)."""
    import httpx

    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def hf_model(default_model_dir):
    """transformers' implementation of the default model: the reference for outputs and logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


@pytest.fixture(scope="session")
def scrape():
    """`scrape(server)` -> every sample of its /metrics as {"name{labels}": value}."""
    import httpx

    def read(server: ServerProcess) -> dict[str, float]:
        response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        response.raise_for_status()
        return _parse_metrics(response.text)

    return read


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY
