"""Chat completions on a real server (real engine, default model), driven by the official openai client and
checked against transformers' implementation of the same model."""

from __future__ import annotations

import math

import openai
import pytest

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


def _hf_greedy(hf_model, messages, max_new_tokens):
    """transformers' greedy continuation of the chat: (prompt ids, generated ids, per-step log-softmax)."""
    import torch

    model, tokenizer = hf_model
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.eos_token_id,
        )
    generated = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [torch.log_softmax(s[0].float(), dim=-1) for s in out.scores]  # each [vocab]
    return ids[0].tolist(), generated, logprobs


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol"]
    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-served")


def test_greedy_chat_equals_transformers_and_counts_usage(client, hf_model):
    prompt_ids, generated, _ = _hf_greedy(hf_model, MESSAGES, 16)
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=16)
    tokenizer = hf_model[1]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(generated, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if tokenizer.eos_token_id in generated else "length")
    assert reply.model == "smol" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(generated)
    assert reply.usage.total_tokens == len(prompt_ids) + len(generated)


def test_streamed_chat_adds_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert content_chunks[-1].choices[0].finish_reason is not None
    # include_usage: a last chunk with no choices carries the usage; the others carry none.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_logprobs_are_transformers_log_softmax(client, hf_model):
    _, generated, reference = _hf_greedy(hf_model, MESSAGES, 8)
    tokenizer = hf_model[1]
    reply = client.chat.completions.create(
        model="smol", messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    visible = [t for t in generated if t != tokenizer.eos_token_id]
    assert len(content) == len(visible)
    for step, (item, token_id) in enumerate(zip(content, visible, strict=True)):
        ref = reference[step]
        assert item.token == tokenizer.decode([token_id])
        assert item.bytes == list(item.token.encode())
        assert math.isclose(item.logprob, ref[token_id].item(), abs_tol=2e-3)
        top_ids = ref.topk(3).indices.tolist()
        assert [t.token for t in item.top_logprobs] == [tokenizer.decode([i]) for i in top_ids]
        for top, token in zip(item.top_logprobs, top_ids, strict=True):
            assert math.isclose(top.logprob, ref[token].item(), abs_tol=2e-3)


def test_stop_string_cuts_the_answer_where_it_starts(client):
    whole = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=30)
    text = whole.choices[0].message.content
    assert len(text) > 12, text
    # A stop string that starts mid-answer and spans characters of several tokens.
    middle = len(text) // 2
    stop = text[middle : middle + 5]
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=30, stop=[stop])
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_n_gives_distinct_samples(client):
    def sample(seed, n=1):
        reply = client.chat.completions.create(
            model="smol", messages=MESSAGES, temperature=1.0, max_tokens=24, seed=seed, n=n
        )
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)], reply

    first, _ = sample(1234)
    again, _ = sample(1234)
    other, _ = sample(98765)
    assert first == again
    assert first != other
    pair, reply = sample(7, n=2)
    assert [c.index for c in sorted(reply.choices, key=lambda c: c.index)] == [0, 1]
    assert pair[0] != pair[1]
    assert sample(7, n=2)[0] == pair
    # Usage counts both choices' tokens (each at most max_tokens, and more than one).
    assert 2 < reply.usage.completion_tokens <= 48


def test_n2_stream_interleaves_indices_and_finishes_both(client):
    stream = client.chat.completions.create(
        model="smol", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=12, n=2, stream=True
    )
    texts = {0: "", 1: ""}
    finished = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}
    whole = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=12, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]


def test_max_completion_tokens_and_penalties_are_honoured(client):
    reply = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=5,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.1, "ignore_eos": True, "top_k": 5, "min_p": 0.05},
    )
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_logit_bias_forces_a_token(client, hf_model):
    tokenizer = hf_model[1]
    token_id = tokenizer.encode(" banana", add_special_tokens=False)[0]
    reply = client.chat.completions.create(
        model="smol", messages=MESSAGES, temperature=0, max_tokens=3, logit_bias={str(token_id): 100}
    )
    assert reply.choices[0].message.content == tokenizer.decode([token_id] * 3)


def test_content_parts_and_tool_messages_are_accepted(client):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    reply = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=4)
    assert reply.choices[0].message.content
