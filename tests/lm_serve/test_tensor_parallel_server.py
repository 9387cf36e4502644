"""`lm serve api_server --tp 2` on the CPU, driven by the official openai client: chat, streaming and forced tool
calls through two tensor-parallel worker processes; then a worker killed: 503 with an OpenAI-style body.

The model is lm-lite's tiny random Llama with the default model's tokenizer and chat template (4 heads over 2 KV
heads: tp 2 splits both). A tp 1 server of the same model gives the reference outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

FLAGS = ["--model-name", "tiny", "--session-len", "256", "--num-kv-blocks", "64", "--max-batch-size", "8"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_dir, tiny_models) -> Path:
    return tiny_models.make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="module")
def servers(tiny_llama, server_process):
    split = server_process(tiny_llama, *FLAGS, "--tp", "2")
    try:
        single = server_process(tiny_llama, *FLAGS, "--num-threads", "1")
    except BaseException:
        split.stop()
        raise
    yield split, single
    split.stop()
    single.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _chat(server, **kwargs):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return _client(server).chat.completions.create(model="tiny", messages=messages, **{"max_tokens": 24, **kwargs})


def test_chat_and_streaming_match_the_single_process_server(servers):
    split, single = servers
    answer = _chat(split, temperature=0)
    assert answer.choices[0].message.content == _chat(single, temperature=0).choices[0].message.content
    stream = _chat(split, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0


def test_a_forced_tool_call(servers):
    split, single = servers
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = _chat(split, temperature=0, tools=[WEATHER], tool_choice=choice, max_tokens=64)
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert isinstance(arguments["city"], str)
    reference = _chat(single, temperature=0, tools=[WEATHER], tool_choice=choice, max_tokens=64)
    assert reference.choices[0].message.tool_calls[0].function.arguments == calls[0].function.arguments


def _workers(pid: int) -> list[int]:
    """The worker processes the server started: its spawned children (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]


def test_a_killed_worker_turns_requests_into_503(servers):
    split, _ = servers
    workers = _workers(split.process.pid)
    assert len(workers) == 2, split.output()
    os.kill(workers[-1], signal.SIGKILL)
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = httpx.get(f"{split.url}/health", timeout=30).status_code
        if status == 503:
            break
        # A request makes the engine notice at once (its step fails); /health then says why.
        with contextlib.suppress(openai.APIStatusError):
            _chat(split, max_tokens=4)
        time.sleep(0.5)
    assert status == 503, split.output()
    with pytest.raises(openai.APIStatusError) as error:
        _chat(split)
    assert error.value.status_code == 503
    body = error.value.response.json()["error"]
    assert body["code"] == "engine_unavailable" and "rank" in body["message"]
    assert split.process.poll() is None  # the server itself keeps answering
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False
