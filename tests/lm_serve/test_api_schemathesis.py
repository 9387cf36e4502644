"""Schemathesis against the server's own OpenAPI spec: whatever it sends, the server never answers 5xx.

Requests are generated from the spec the server publishes (valid ones and, in negative mode, ones that break it)
and sent to a real server; every response must be below 500. (Schemathesis' pytest loader does not run under
this pytest version, so the cases are drawn with its hypothesis strategies directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

FUZZ_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/embeddings"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    # A short context keeps each generated request cheap (at most a few dozen tokens).
    return start_server(
        "--session-len",
        "96",
        "--num-kv-blocks",
        "48",
        "--max-batch-size",
        "32",
        "--api-keys",
        FUZZ_KEY,
        "--model-name",
        "smol",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
        "--num-threads",
        "1",
    )


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=AUTH, timeout=60)


def test_the_spec_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert set(OPERATIONS) <= listed


def _repair(body: dict) -> None:
    """Turn the spec's valid shapes into requests that mostly reach the engine: the spec cannot say that a message
    needs content unless it has tool calls, or that /tokenize takes prompt or messages, so random ones are 400s."""
    if "model" in body:
        body["model"] = "smol"  # a served model (unknown ones are a 400, tested elsewhere)
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            message.pop("tool_calls", None)
            message["role"] = "user" if message.get("role") == "tool" else message.get("role", "user")
            if not isinstance(message.get("content"), str):
                message["content"] = "Hi there"
    if body.get("prompt") is not None and body.get("messages") is not None:
        body.pop("messages")
    if isinstance(body.get("input"), list) and "encoding_format" not in body:  # Responses input items
        for item in body["input"]:
            if isinstance(item, dict) and item.get("type", "message") == "message":
                item["role"] = item["role"] if item.get("role") in ("user", "assistant", "system") else "user"
                if not isinstance(item.get("content"), str):
                    item["content"] = "Hi there"


CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # Routes without parameters or body have no invalid requests to generate.
    if mode is GenerationMode.POSITIVE or method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_generated_request_gets_a_5xx(api_schema, fuzz_server, method, path, mode):
    operation = api_schema[path][method]
    failures = []
    statuses: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
        database=None,
    )
    def check(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            _repair(case.body)
        response = case.call(base_url=fuzz_server.url, headers=AUTH, timeout=120)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append((case.as_curl_command(headers=AUTH), response.status_code, response.text[:500]))
        # Errors are always OpenAI-shaped JSON.
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
    print("\nFUZZ", method, path, mode.value, statuses)
    assert not failures, failures
