"""`/v1/embeddings` with the openai client, against transformers' final hidden states of the same model."""

from __future__ import annotations

import base64
import math
import struct

import pytest

TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force."]


def _hf_embedding(hf_model, text, pooling):
    import torch

    model, tokenizer = hf_model
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]  # [tokens, hidden], after the final norm
    vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return (vector / vector.norm()).tolist(), ids.shape[1]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_are_pooled_final_hidden_states(client, hf_model, pooling):
    reply = client.embeddings.create(model="smol", input=TEXTS, extra_body={"pooling": pooling})
    assert [d.index for d in reply.data] == [0, 1]
    total = 0
    for item, text in zip(reply.data, TEXTS, strict=True):
        reference, count = _hf_embedding(hf_model, text, pooling)
        total += count
        assert len(item.embedding) == len(reference)
        assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-4)
        cosine = sum(a * b for a, b in zip(item.embedding, reference, strict=True))
        assert cosine > 0.9999
    assert reply.usage.prompt_tokens == total


def test_base64_encoding_carries_the_same_floats(client):
    floats = client.embeddings.create(model="smol", input=TEXTS[0], encoding_format="float").data[0].embedding
    encoded = client.embeddings.create(model="smol", input=TEXTS[0], encoding_format="base64").data[0].embedding
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)  # little-endian float32, as OpenAI sends it
    assert len(decoded) == len(floats)
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(decoded, floats, strict=True))
