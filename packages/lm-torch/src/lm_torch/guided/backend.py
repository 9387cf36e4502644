"""`GrammarBackend`: turns a request's `response_format` into an xgrammar grammar and a fresh matcher.

One backend per engine: xgrammar's view of the tokenizer (every token's bytes) is built once, and one
`GrammarCompiler` serves every request. Compiling takes milliseconds to seconds: the engine calls `compile` through
`GrammarPool` (worker threads, a time limit, a bounded cache keyed by `cache_key`), never on the event loop.
xgrammar's own cache is off: it is unbounded, and the pool's cache replaces it.

Formats (validated in shape by `GenerationConfig`):
- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"schema": {...}}}`: JSON valid against the schema;
- `{"type": "regex", "regex": "..."}`: text the regular expression fully matches.
JSON is compact (no free whitespace between tokens): with free whitespace a small model can loop on newlines until
max_new_tokens, and a schema's output is as valid either way. Schemas are strict: no properties or items the schema
does not name, the same subset of valid documents OpenAI's strict mode produces. Before compiling, `check_schema`
refuses schemas no JSON value satisfies and keywords xgrammar would not enforce (see `lm_torch.guided.schema`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from lm_torch.guided.schema import check_schema
from lm_torch.guided.state import GrammarState


def xgrammar_available() -> bool:
    """Whether guided decoding can run here (xgrammar is installed and imports)."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class GrammarBackend:
    """Compiles response formats for one model; `new_state` gives each guided request its own matcher."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_threads: int = 1) -> None:
        """`tokenizer`: the model's Hugging Face tokenizer; `vocab_size`: the model's (the logits' width before any
        padding), which may exceed the tokenizer's own count: the extra ids are never allowed."""
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # One thread per compile: the pool runs several compiles at once, and a slow one must not take every core
        # from the model's step thread.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)

    @staticmethod
    def cache_key(response_format: dict[str, Any]) -> str:
        """The text that decides the compiled grammar: the format's type and its schema (compact JSON, properties in
        their given order, which the output follows) or regex; names, descriptions and `strict` do not count."""
        kind = response_format.get("type")
        if kind == "json_schema":
            schema = response_format["json_schema"]["schema"]
            return "json_schema:" + json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if kind == "regex":
            return "regex:" + response_format["regex"]
        return str(kind)

    def compile(self, response_format: dict[str, Any]) -> Any:
        """The `xgrammar.CompiledGrammar` of `response_format`; ValueError naming response_format if it can't be."""
        kind = response_format.get("type")
        if kind == "json_schema":
            schema = check_schema(response_format["json_schema"]["schema"])
        try:
            if kind == "json_object":
                # Not strict: an object with any properties.
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "json_schema":
                return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
            if kind == "regex":
                return self.compiler.compile_regex(response_format["regex"])
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with its parser's message
            what = {"json_schema": "JSON schema", "regex": "regular expression"}.get(str(kind), "format")
            raise ValueError(f"response_format: xgrammar cannot compile the {what}: {_first_line(exc)}") from None
        raise ValueError(f"response_format type {kind!r} is not one of json_object, json_schema, regex")

    def new_state(self, response_format: dict[str, Any], stop_token_ids: list[int] | None) -> GrammarState:
        """A matcher for one request. `stop_token_ids` (the request's, EOS included unless ignore_eos) end the output
        once the grammar is complete; without any, the tokenizer's EOS does."""
        stop = [t for t in stop_token_ids or () if 0 <= t < self.vocab_size]
        return GrammarState(self.compile(response_format), stop or None)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # xgrammar prefixes its C++ errors with "[HH:MM:SS] /path/file.cc:LINE: ": the user needs only the reason.
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0])[:500]
