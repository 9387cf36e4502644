"""Text completions on the real server with the official openai client, against transformers' greedy output."""

from __future__ import annotations

import math

PROMPT = "The capital of France is"


def _hf_greedy_text(hf_model, prompt_ids, max_new_tokens):
    import torch

    model, tokenizer = hf_model
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    generated = out[0, len(prompt_ids) :].tolist()
    return tokenizer.decode(generated, skip_special_tokens=True), generated


def test_greedy_completion_equals_transformers(client, hf_model):
    tokenizer = hf_model[1]
    prompt_ids = tokenizer(PROMPT).input_ids
    text, generated = _hf_greedy_text(hf_model, prompt_ids, 12)
    reply = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=12)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == text
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(generated)
    # The same prompt as token ids gives the same text.
    by_ids = client.completions.create(model="smol", prompt=prompt_ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == text


def test_prompt_list_and_n_give_one_choice_per_sample_in_order(client):
    prompts = [PROMPT, "Once upon a time"]
    singles = [
        client.completions.create(model="smol", prompt=p, temperature=0, max_tokens=8).choices[0].text for p in prompts
    ]
    batch = client.completions.create(model="smol", prompt=prompts, temperature=0, max_tokens=8, n=2)
    choices = sorted(batch.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    # Prompt p's samples are choices p*n .. p*n+n-1; greedy samples are identical.
    assert [c.text for c in choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_echo_prepends_the_prompt(client):
    reply = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=5, echo=True)
    plain = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=5)
    assert reply.choices[0].text == PROMPT + plain.choices[0].text


def test_completion_logprobs_shape_and_values(client, hf_model):
    import torch

    model, tokenizer = hf_model
    reply = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=4, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    ids = tokenizer(PROMPT).input_ids
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        token_id = int(ref.argmax())  # greedy
        assert token == tokenizer.decode([token_id])
        assert math.isclose(logprob, ref[token_id].item(), abs_tol=2e-3)
        assert len(top) == 2 and token in top
        ids.append(token_id)


def test_streamed_completion_adds_up(client):
    whole = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=10)
    chunks = list(
        client.completions.create(
            model="smol",
            prompt=PROMPT,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_and_seed_on_completions(client):
    whole = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=16).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = client.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=16, stop=stop)
    assert cut.choices[0].text == whole[: whole.index(stop)]
    a = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, seed=11, temperature=1.0)
    b = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, seed=11, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text
