"""Bad input gets OpenAI's error shape and the right status; auth; the small endpoints (health, tokenize, metrics)."""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Hello!"}]


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = "unset") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "unset":
        assert error["param"] == param, error
    return error


def test_unknown_model_is_a_404_naming_the_model(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
        ({"messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "stream": "sometimes"}, "stream"),
        ({"messages": MESSAGES, "stop": [1, 2]}, "stop"),
        ({"messages": MESSAGES, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": MESSAGES, "seed": -(2**70)}, "seed"),
        ({"messages": MESSAGES, "logit_bias": {"999999999": 5}}, "logit_bias"),
        ({"messages": MESSAGES, "stop": [""]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "x"}]}, "messages[0]"),
        ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": MESSAGES,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(http, body, param):
    response = http.post("/v1/chat/completions", json={"model": "smol", **body})
    error = _assert_openai_error(response, 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_missing_body_are_400(http):
    response = http.post(
        "/v1/chat/completions", content=b'{"model": "smol", "messages": [', headers={"content-type": "application/json"}
    )
    assert _assert_openai_error(response, 400)["code"] == "invalid_json"
    _assert_openai_error(http.post("/v1/completions"), 400)


def test_prompt_longer_than_the_context_is_400_streaming_or_not(client):
    long_text = "word " * 2000  # far beyond --session-len 512
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": long_text}], max_tokens=4, stream=stream
            )
        assert "session length" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=100000)


def test_unknown_fields_are_ignored(http):
    body = {"model": "smol", "messages": MESSAGES, "max_tokens": 2, "temperature": 0, "some_future_field": [1, 2]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_route_and_method_use_the_error_shape(http):
    _assert_openai_error(http.get("/v1/nothing-here"), 404)
    _assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_api_keys_guard_every_route_but_health(api_server, api_key):
    base = api_server.url
    assert httpx.get(f"{base}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")]:
        missing = httpx.request(method, f"{base}{path}", json={})
        assert _assert_openai_error(missing, 401)["code"] == "invalid_api_key"
        wrong = httpx.request(method, f"{base}{path}", json={}, headers={"Authorization": "Bearer nope"})
        _assert_openai_error(wrong, 401)
    # Both configured keys work.
    for key in (api_key, "test-key-2"):
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    bad_client = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_tokenize_and_detokenize_match_the_model_tokenizer(http, hf_model):
    tokenizer = hf_model[1]
    text = "The quick brown fox jumps over the lazy dog."
    out = http.post("/tokenize", json={"model": "smol", "prompt": text}).json()
    assert out["tokens"] == tokenizer(text).input_ids
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    chat = http.post("/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False).input_ids
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat["tokens"])
    back = http.post("/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(out["tokens"])
    _assert_openai_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    _assert_openai_error(http.post("/tokenize", json={}), 400)


def test_metrics_count_requests_tokens_and_latencies(http, client, api_server, scrape):
    before = scrape(api_server)
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=6)
    after = scrape(api_server)
    usage = reply.usage

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("lm_prompt_tokens_total") == usage.prompt_tokens
    assert delta("lm_generation_tokens_total") == usage.completion_tokens
    reason = reply.choices[0].finish_reason
    assert delta(f'lm_requests_finished_total{{finish_reason="{reason}"}}') == 1
    for histogram in ("lm_time_to_first_token_seconds", "lm_e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == 1
        assert delta(f"{histogram}_sum") > 0
    assert delta("lm_time_per_output_token_seconds_count") == 1
    for gauge in ("lm_requests_running", "lm_requests_waiting", "lm_kv_cache_usage_ratio", "lm_prefix_cache_hit_rate"):
        assert gauge in after
    assert after["lm_kv_cache_usage_ratio"] == 0.0
    assert after["lm_http_requests_in_flight"] == 0.0


def test_interactive_docs_and_openapi_are_served(http):
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models"):
        assert path in spec["paths"]
