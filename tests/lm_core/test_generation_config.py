"""GenerationConfig: validation that names the field, and model defaults that never override the user."""

from __future__ import annotations

import json

import pytest

from lm_core.generation_config import GenerationConfig, load_model_generation_defaults

BAD_VALUES = [
    ("n", 0),
    ("n", 1.5),
    ("max_new_tokens", -1),
    ("min_new_tokens", -1),
    ("do_sample", "yes"),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {5: 200.0}),
    ("logit_bias", [1, 2]),
    ("random_seed", -3),
    ("stop_words", ["ok", ""]),
    ("stop_words", [1]),
    ("stop_token_ids", [-1]),
    ("bad_token_ids", ["a"]),
    ("bad_words", 7),
    ("ignore_eos", 1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", True),
    ("response_format", {"type": "yaml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("response_format", {"type": "regex", "regex": "(unclosed"}),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_invalid_values_name_the_field(name, value):
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{name}"):
        GenerationConfig(**{name: value})


def test_unknown_field_and_inconsistent_lengths():
    with pytest.raises(ValueError, match=r"no field.*max_tokens"):
        GenerationConfig(max_tokens=3)
    with pytest.raises(ValueError, match=r"min_new_tokens.*exceeds max_new_tokens"):
        GenerationConfig(min_new_tokens=10, max_new_tokens=5)


def test_normalisation():
    cfg = GenerationConfig(stop_words="###", stop_token_ids=7, logit_bias={"12": 5, 3: -100}, temperature=1)
    assert cfg.stop_words == ["###"] and cfg.stop_token_ids == [7]
    assert cfg.logit_bias == {12: 5.0, 3: -100.0}
    assert isinstance(cfg.temperature, float)
    assert GenerationConfig(response_format={"type": "text"}).response_format is None


def test_greedy_unless_sampling_with_positive_temperature():
    assert GenerationConfig().is_greedy
    assert GenerationConfig(temperature=0.7).is_greedy
    assert GenerationConfig(do_sample=True, temperature=0.0).is_greedy
    assert not GenerationConfig(do_sample=True, temperature=0.7).is_greedy
    # Below the floor a temperature would overflow the logits: such a request is greedy.
    assert GenerationConfig(do_sample=True, temperature=1e-300).is_greedy
    assert GenerationConfig(do_sample=True, temperature=9e-6).is_greedy
    assert not GenerationConfig(do_sample=True, temperature=1e-5).is_greedy


def test_prefill_only_and_prompt_logprobs_are_valid():
    cfg = GenerationConfig(max_new_tokens=0, prompt_logprobs=0)
    assert (cfg.max_new_tokens, cfg.prompt_logprobs) == (0, 0)
    assert GenerationConfig(prompt_logprobs=20).prompt_logprobs == 20
    with pytest.raises(ValueError, match=r"min_new_tokens.*exceeds max_new_tokens"):
        GenerationConfig(max_new_tokens=0, min_new_tokens=1)


def test_model_defaults_fill_only_unset_fields(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "eos_token_id": [2, 5]})
    )
    defaults = load_model_generation_defaults(tmp_path)
    merged = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=8).with_model_defaults(defaults)
    assert merged.temperature == 1.0  # set by the user, even though it equals the built-in default
    assert (merged.do_sample, merged.top_p, merged.top_k) == (True, 0.9, 20)
    assert merged.max_new_tokens == 8
    # Whether to sample is the caller's: the model's do_sample fills nothing, its sampling values wait for it.
    unset = GenerationConfig().with_model_defaults(defaults)
    assert unset.is_greedy and (unset.temperature, unset.top_p) == (0.6, 0.9)
    untouched = GenerationConfig().with_model_defaults({})
    assert untouched == GenerationConfig()
    assert load_model_generation_defaults(tmp_path / "missing") == {}


def test_replace_validates_and_counts_as_explicit():
    cfg = GenerationConfig(top_k=5).replace(top_p=0.5)
    assert cfg.explicit_fields == {"top_k", "top_p"}
    assert cfg.with_model_defaults({"top_p": 0.9, "top_k": 40}).top_p == 0.5
    with pytest.raises(ValueError, match=r"GenerationConfig\.top_p"):
        cfg.replace(top_p=2.0)
