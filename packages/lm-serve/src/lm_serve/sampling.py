"""OpenAI request fields -> `lm_core.GenerationConfig` (LMDeploy's names), with errors that name the OpenAI field.

Temperature follows OpenAI and vLLM: unset means the model's generation_config.json temperature (sampling), or its
`do_sample: false` (greedy), or else 1.0; 0 means greedy. Fields left unset are not passed, so the model's own
defaults (its recommended top-p, top-k, ...) apply to them.
"""

from __future__ import annotations

from typing import Any

from lm_core.generation_config import GenerationConfig
from lm_serve.errors import APIError, bad_request

# OpenAI seeds are 64-bit signed; GenerationConfig takes [0, 2**63).
_SEED_RANGE = (-(2**63), 2**64)


def build_gen_config(
    req: Any,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    response_format: dict[str, Any] | None,
    model_defaults: dict[str, Any],
    vocab_size: int,
    n: int | None = None,
) -> GenerationConfig:
    """The GenerationConfig for a chat, completion or responses request `req` (a pydantic model)."""
    fields: dict[str, Any] = {"n": req.n if n is None else n, "max_new_tokens": max_tokens}
    fields.update(_temperature_fields(req.temperature, model_defaults))
    optional = {
        "top_p": req.top_p,
        "top_k": _top_k(getattr(req, "top_k", None)),
        "min_p": getattr(req, "min_p", None),
        "presence_penalty": getattr(req, "presence_penalty", None),
        "frequency_penalty": getattr(req, "frequency_penalty", None),
        "repetition_penalty": getattr(req, "repetition_penalty", None),
        "stop_words": req.stop or None,
        "stop_token_ids": getattr(req, "stop_token_ids", None),
        "bad_words": getattr(req, "bad_words", None),
        "min_new_tokens": getattr(req, "min_tokens", None),
        "ignore_eos": getattr(req, "ignore_eos", None),
        "skip_special_tokens": getattr(req, "skip_special_tokens", None),
        "spaces_between_special_tokens": getattr(req, "spaces_between_special_tokens", None),
        "include_stop_str_in_output": getattr(req, "include_stop_str_in_output", None),
        "logprobs": logprobs,
        "response_format": response_format,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    if req.seed is not None:
        if not _SEED_RANGE[0] <= req.seed < _SEED_RANGE[1]:
            raise APIError(f"seed must be a 64-bit integer, got {req.seed}", param="seed")
        fields["random_seed"] = req.seed % 2**63
    logit_bias = getattr(req, "logit_bias", None)
    if logit_bias:
        fields["logit_bias"] = _logit_bias(logit_bias, vocab_size)
    for name in ("stop_token_ids",):
        ids = fields.get(name) or []
        if any(not 0 <= i < vocab_size for i in ids):
            raise APIError(f"{name} must be token ids in [0, {vocab_size})", param=name)
    try:
        return GenerationConfig(**fields)
    except ValueError as exc:
        raise bad_request(exc) from None


def _temperature_fields(temperature: float | None, model_defaults: dict[str, Any]) -> dict[str, Any]:
    if temperature is None:
        # The model's generation_config.json decides; its temperature itself is filled in by the pipeline.
        model_temperature = model_defaults.get("temperature")
        if isinstance(model_temperature, (int, float)) and not isinstance(model_temperature, bool):
            return {"do_sample": model_temperature > 0}
        if "do_sample" in model_defaults:
            return {"do_sample": bool(model_defaults["do_sample"])}
        return {"do_sample": True, "temperature": 1.0}
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature}


def _top_k(top_k: int | None) -> int | None:
    # vLLM spells "no top-k" as -1, GenerationConfig as 0.
    return 0 if top_k == -1 else top_k


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise APIError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", param="logit_bias")
        if not -100 <= value <= 100:  # NaN fails this too
            raise APIError(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        out[int(key)] = float(value)
    return out
