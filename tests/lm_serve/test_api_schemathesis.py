"""Schemathesis against the server's own OpenAPI spec: whatever it sends, the server never answers 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

FUZZ_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}


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
    )


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=AUTH, timeout=60)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=120)
