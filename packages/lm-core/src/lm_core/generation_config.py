"""`GenerationConfig`: how one request is decoded. Every engine honours every field or rejects it clearly."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

# Keys of a model's generation_config.json that become defaults, mapped to our field names. `do_sample` is read
# (lm-serve decides from it) but never filled in: whether to sample is the caller's choice.
_HF_DEFAULT_KEYS = {
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_new_tokens",
}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex")
MAX_LOGPROBS = 20
# Temperatures below this count as greedy: dividing logits by a tiny temperature overflows float32 to inf/NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class GenerationConfig:
    """Decoding parameters of one request (LMDeploy's names; OpenAI fields map onto them in lm-serve).

    Sampling is off unless `do_sample` is true and `temperature` >= `GREEDY_TEMPERATURE` (1e-5): otherwise the engine
    picks the arg-max token.
    `top_k=0`, `top_p=1`, `min_p=0` and penalties of 1.0 (repetition) or 0.0 (presence, frequency) disable those.
    Fields the user did not set can take a model's `generation_config.json` values (its recommended temperature,
    top-p, ... once sampling is on): see `with_model_defaults`.

    `max_new_tokens=0` computes the prompt only (the request ends after it with finish reason "length"), for
    `prompt_logprobs`. `logprobs=N` reports, per generated token, its log-probability and the top N of the processed
    distribution; `prompt_logprobs=N` reports, per prompt token after the first, its log-probability and the top N
    of the model's raw distribution (log-softmax of the logits, no penalties or temperature).
    """

    n: int = 1
    max_new_tokens: int | None = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # Names of the fields given to the constructor; the model's defaults never override these.
    explicit_fields: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"GenerationConfig has no field(s) {', '.join(sorted(unknown))}")
        for f in fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.get(f.name, default))
        if "explicit_fields" not in kwargs:
            self.explicit_fields = frozenset(kwargs)
        self.__post_init__()

    def __post_init__(self) -> None:
        _check_int(self, "n", low=1)
        if self.max_new_tokens is not None:
            _check_int(self, "max_new_tokens", low=0)
        _check_int(self, "min_new_tokens", low=0)
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        for name in ("do_sample", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            _check_bool(self, name)
        _check_bool(self, "include_stop_str_in_output")
        _check_float(self, "temperature", lambda v: v >= 0, ">= 0")
        _check_float(self, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        _check_int(self, "top_k", low=0)
        _check_float(self, "min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_float(self, "repetition_penalty", lambda v: v > 0, "> 0")
        _check_float(self, "presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check_float(self, "frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        if self.random_seed is not None:
            _check_int(self, "random_seed", low=0, high=2**63 - 1)
        if self.logprobs is not None:
            _check_int(self, "logprobs", low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int(self, "prompt_logprobs", low=0, high=MAX_LOGPROBS)
        self.stop_words = _string_list(self.stop_words, "stop_words")
        self.bad_words = _string_list(self.bad_words, "bad_words")
        self.stop_token_ids = _id_list(self.stop_token_ids, "stop_token_ids")
        self.bad_token_ids = _id_list(self.bad_token_ids, "bad_token_ids")
        self.logit_bias = _logit_bias(self.logit_bias)
        self.response_format = _response_format(self.response_format)
        self.explicit_fields = frozenset(self.explicit_fields)

    @property
    def is_greedy(self) -> bool:
        """True when the engine must pick the arg-max token at every step."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    def replace(self, *, mark_explicit: bool = True, **changes: Any) -> GenerationConfig:
        """A validated copy with `changes`; they count as set by the user unless `mark_explicit` is False."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        explicit = self.explicit_fields | frozenset(changes) if mark_explicit else self.explicit_fields
        values.update(changes, explicit_fields=explicit)
        return GenerationConfig(**values)

    def with_model_defaults(self, defaults: dict[str, Any]) -> GenerationConfig:
        """Fill the fields the user did not set from a model's generation_config.json values.

        `do_sample` is never taken from the model: decoding stays greedy unless the caller turns sampling on (as
        LMDeploy's pipeline does); lm-serve turns it on for requests without a temperature (as OpenAI does).
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for hf_key, name in _HF_DEFAULT_KEYS.items():
            if name == "do_sample":
                continue
            if name not in self.explicit_fields and defaults.get(hf_key) is not None:
                values[name] = defaults[hf_key]
        return GenerationConfig(**values)


def as_gen_config(value: GenerationConfig | dict[str, Any] | None) -> GenerationConfig:
    """`value` as a GenerationConfig: None gives the defaults, a dict its fields (a ValueError names unknown keys)."""
    if value is None:
        return GenerationConfig()
    if isinstance(value, GenerationConfig):
        return value
    given = cast(object, value)
    if isinstance(given, dict):
        keys = list(cast(dict[object, Any], given))
        if not all(isinstance(key, str) for key in keys):
            raise ValueError(f"gen_config keys must be GenerationConfig field names, got {keys!r}")
        return GenerationConfig(**cast(dict[str, Any], given))
    raise ValueError(f"gen_config must be a GenerationConfig or a dict of its fields, got {type(value).__name__}")


def load_model_generation_defaults(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The sampling defaults in `model_dir/generation_config.json` (empty when there is none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k in _HF_DEFAULT_KEYS or k == "eos_token_id"}


def _fail(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"GenerationConfig.{name} must be {expected}, got {value!r}")


def _check_bool(cfg: GenerationConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")


def _check_int(cfg: GenerationConfig, name: str, low: int | None = None, high: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _fail(name, value, f"an integer {bounds}")


def _check_float(cfg: GenerationConfig, name: str, ok: Callable[[float], bool], expected: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise _fail(name, value, f"a number {expected}")
    setattr(cfg, name, float(value))


def _string_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    items: object = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise _fail(name, value, "a string or a list of strings")
    strings: list[object] = list(cast(Sequence[object], items))
    if not all(isinstance(s, str) for s in strings):
        raise _fail(name, value, "a string or a list of strings")
    if any(s == "" for s in strings):
        raise _fail(name, value, "non-empty strings")
    return list(dict.fromkeys(cast(list[str], strings))) or None


def _id_list(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    items: object = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise _fail(name, value, "a token id or a list of token ids")
    entries: list[object] = list(cast(Sequence[object], items))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in entries):
        raise _fail(name, value, "a token id or a list of token ids")
    ids = cast(list[int], entries)
    if any(i < 0 for i in ids):
        raise _fail(name, value, "non-negative token ids")
    return list(dict.fromkeys(ids)) or None


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail("logit_bias", value, "a mapping of token id to bias")
    bias: dict[int, float] = {}
    for key, amount in cast(dict[object, object], value).items():
        # JSON objects (the OpenAI API) carry token ids as strings.
        if isinstance(key, str) and re.fullmatch(r"\d+", key):
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise _fail("logit_bias", value, "keyed by non-negative token ids")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise _fail("logit_bias", value, "biases in [-100, 100]")
        bias[key] = float(amount)
    return bias or None


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    fmt = cast(dict[str, Any], value) if isinstance(value, dict) else None
    if fmt is None or fmt.get("type") not in RESPONSE_FORMAT_TYPES:
        raise _fail("response_format", value, f"a mapping whose 'type' is one of {', '.join(RESPONSE_FORMAT_TYPES)}")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_schema":
        spec: object = fmt.get("json_schema")
        schema = cast(dict[str, Any], spec).get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _fail("response_format", value, "{'type': 'json_schema', 'json_schema': {'schema': {...}}}")
    if kind == "regex":
        pattern: object = fmt.get("regex")
        if not isinstance(pattern, str) or not pattern:
            raise _fail("response_format", value, "{'type': 'regex', 'regex': '<pattern>'}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _fail("response_format", value, f"a valid regular expression ({exc})") from None
    return dict(fmt)
