"""Prompt logprobs through the server, against transformers' log_softmax over the same token ids (float32, CPU).

`/v1/completions` with `echo` and `logprobs` returns OpenAI's legacy object over prompt + generated tokens (first
entry null), as lm-eval-harness reads it; `max_tokens: 0` with `echo` scores the prompt alone. vLLM's
`prompt_logprobs` extension works on completions and chat. Also `/tokenizer_info` and the tiny-temperature floor.
"""

from __future__ import annotations

import json

import pytest
import torch

TOLERANCE = 1e-4
PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see the river."


def _reference(hf_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row i is the distribution of token i + 1. [len(ids), vocab]"""
    model, _ = hf_model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _check_legacy(logprobs: dict, ids: list[int], reference: torch.Tensor, num_top: int, tokenizer) -> None:
    """The legacy object's first len(ids) entries: the prompt tokens, null first, then transformers' values."""
    assert logprobs["tokens"][: len(ids)] == [_token_text(tokenizer, t) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    offsets = [0]
    for text in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(text))
    assert logprobs["text_offset"] == offsets
    for i in range(1, len(ids)):
        row = reference[i - 1]
        assert logprobs["token_logprobs"][i] == pytest.approx(row[ids[i]].item(), abs=TOLERANCE)
        top = row.topk(num_top)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        expected = {_token_text(tokenizer, t): v for t, v in pairs}
        got = logprobs["top_logprobs"][i]
        assert got.keys() == expected.keys(), f"position {i}"
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=TOLERANCE)


def test_echo_with_logprobs_covers_prompt_and_generated_tokens(client, hf_model):
    _, tokenizer = hf_model
    ids = tokenizer(PROMPT).input_ids
    reference = _reference(hf_model, ids)
    out = client.completions.create(model="smol", prompt=PROMPT, echo=True, logprobs=2, max_tokens=1, temperature=0)
    choice = out.choices[0]
    logprobs = choice.logprobs.model_dump()
    assert len(logprobs["tokens"]) == len(ids) + 1
    _check_legacy(logprobs, ids, reference, 2, tokenizer)
    # The generated token: greedy, so the arg-max of the distribution after the prompt, with its logprob.
    with torch.no_grad():
        last = torch.log_softmax(hf_model[0](torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    generated = int(last.argmax())
    assert logprobs["tokens"][-1] == _token_text(tokenizer, generated)
    assert logprobs["token_logprobs"][-1] == pytest.approx(last[generated].item(), abs=TOLERANCE)
    assert choice.text == PROMPT + _token_text(tokenizer, generated)
    assert logprobs["text_offset"][-1] == len(PROMPT)
    # lm-eval's greedy check: the continuation token is the most likely one.
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())


def test_max_tokens_zero_with_echo_scores_token_id_prompts(http, hf_model):
    """Older lm-eval sends max_tokens 0 with a batch of token-id prompts; without echo, 0 is refused (as vLLM)."""
    _, tokenizer = hf_model
    prompts = [tokenizer(PROMPT).input_ids, tokenizer("Paris is the capital of").input_ids]
    body = {"model": "smol", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    for choice, ids in zip(sorted(data["choices"], key=lambda c: c["index"]), prompts, strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tokenizer.decode(ids)
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        _check_legacy(choice["logprobs"], ids, _reference(hf_model, ids), 1, tokenizer)
    refused = http.post("/v1/completions", json={**body, "echo": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_logprobs_equal_the_whole_answer(http):
    body = {"model": "smol", "prompt": PROMPT, "echo": True, "logprobs": 3, "max_tokens": 4, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                for key in merged:
                    merged[key] += (choice["logprobs"] or {}).get(key, [])
    assert text == whole["text"]
    assert merged["tokens"] == whole["logprobs"]["tokens"]
    assert merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert merged["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=TOLERANCE)


def _check_vllm_shape(entries: list, ids: list[int], reference: torch.Tensor, num_top: int, tokenizer) -> None:
    """vLLM's prompt_logprobs: null, then {token id: {logprob, rank, decoded_token}} of the prompt token + top N."""
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        row, entry = reference[i - 1], entries[i]
        top = row.topk(num_top)
        expected = {ids[i]: row[ids[i]].item()}
        expected.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        assert {int(t) for t in entry} == set(expected), f"position {i}"
        ranks = {t: r for r, t in enumerate(top.indices.tolist(), 1)}
        for token, value in expected.items():
            item = entry[str(token)]
            assert item["logprob"] == pytest.approx(value, abs=TOLERANCE)
            assert item["rank"] == ranks.get(token)
            assert item["decoded_token"] == _token_text(tokenizer, token)


def test_vllm_prompt_logprobs_extension(client, http, hf_model):
    _, tokenizer = hf_model
    ids = tokenizer(PROMPT).input_ids
    out = client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    choice = out.choices[0].model_dump()
    assert choice["logprobs"] is None  # the legacy object only with `logprobs`
    _check_vllm_shape(choice["prompt_logprobs"], ids, _reference(hf_model, ids), 3, tokenizer)

    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(
        model="smol", messages=messages, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 1}
    ).model_dump()
    chat_ids = http.post("/tokenize", json={"model": "smol", "messages": messages}).json()["tokens"]
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    _check_vllm_shape(chat["prompt_logprobs"], chat_ids, _reference(hf_model, chat_ids), 1, tokenizer)

    for route, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": messages}),
    ):
        refused = http.post(route, json={"model": "smol", **body, "stream": True, "prompt_logprobs": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"
        too_many = http.post(route, json={"model": "smol", **body, "prompt_logprobs": 21})
        assert too_many.status_code == 400


def test_tokenizer_info(http, api_server, hf_model):
    import httpx

    _, tokenizer = hf_model
    info = http.get("/tokenizer_info").json()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert info[name] == getattr(tokenizer, name)
        assert info[f"{name}_id"] == getattr(tokenizer, f"{name}_id")
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == 512 and info["vocab_size"] == len(tokenizer)
    assert httpx.get(f"{api_server.url}/tokenizer_info", timeout=30).status_code == 401  # the API key applies


def test_tiny_temperature_is_greedy(client):
    """Dividing the logits by 1e-300 overflows them: below 1e-5 a temperature means greedy, as in vLLM."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=24)
    for temperature in (1e-300, 1e-7):
        tiny = client.chat.completions.create(model="smol", messages=messages, temperature=temperature, max_tokens=24)
        assert tiny.choices[0].message.content == greedy.choices[0].message.content
    assert "Paris" in greedy.choices[0].message.content
