"""Requests without sampling fields take the model's generation_config.json sampling (as vLLM does): the default
model ships what SmolLM2's authors recommend (temperature 0.2, top-p 0.9), so an unset temperature is no 1.0."""

from __future__ import annotations

import json

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_default_model_ships_its_recommended_sampling(default_model_dir):
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.2, 0.9)


def test_unset_sampling_fields_take_the_models_values(client):
    def answer(**sampling) -> str:
        response = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=48, seed=11, **sampling)
        return response.choices[0].message.content

    unset = answer()
    # The same seed with the model's values given explicitly draws the same tokens; OpenAI's 1.0 draws others.
    assert unset == answer(temperature=0.2, top_p=0.9)
    assert unset != answer(temperature=1.0, top_p=1.0)
