"""Engine logprobs -> OpenAI's two shapes: chat's `content[{token, logprob, bytes, top_logprobs}]` and the
completions API's `{tokens, token_logprobs, top_logprobs, text_offset}` (over the prompt too with `echo`); and vLLM's
`prompt_logprobs` extension: per prompt token null (the first) or `{token id: {logprob, rank, decoded_token}}`.

Per token the engine gives `{token_id: logprob}` holding that token (sampled, or the prompt's) and the top N.
Masked tokens may have -inf, which JSON cannot carry: it becomes `LOGPROB_FLOOR`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

LOGPROB_FLOOR = -9999.0


def clamp(value: float) -> float:
    """`value`, or `LOGPROB_FLOOR` where it is not finite (JSON has no -inf)."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


class TokenTexts:
    """Each token's own text (as OpenAI reports `token`), cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The token's own text."""
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _top(entry: dict[int, float], sampled: int, num_top: int) -> list[tuple[int, float]]:
    candidates = dict(entry)
    # The sampled token is in the mapping even when it is outside the top N; then it is not one of the top N.
    if len(candidates) > num_top and sampled in candidates:
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
        if sampled not in {t for t, _ in ranked[:num_top]}:
            candidates.pop(sampled)
    return sorted(candidates.items(), key=lambda kv: -kv[1])[:num_top]


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, float]] | None, num_top: int, texts: TokenTexts
) -> list[dict[str, Any]]:
    """`logprobs.content` items for `token_ids` (those generated in one piece)."""
    content = []
    for token_id, entry in zip(token_ids, entries or [], strict=False):
        text = texts(token_id)
        top = [
            {"token": texts(t), "logprob": clamp(lp), "bytes": list(texts(t).encode("utf-8"))}
            for t, lp in _top(entry, token_id, num_top)
        ]
        content.append(
            {
                "token": text,
                "logprob": clamp(entry.get(token_id, -math.inf)),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": top,
            }
        )
    return content


class CompletionLogprobs:
    """Accumulates the completions API's logprobs object for one choice; `text_offset` counts from `start`."""

    def __init__(self, num_top: int, texts: TokenTexts, start: int = 0) -> None:
        self.num_top = num_top
        self.texts = texts
        self.offset = start

    def render(self, token_ids: list[int], entries: Sequence[dict[int, float] | None] | None) -> dict[str, Any]:
        """The object for the tokens of one piece (streamed), of the whole choice, or of the echoed prompt (whose
        first entry is None: null logprobs)."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries or [], strict=False):
            text = self.texts(token_id)
            out["tokens"].append(text)
            if entry is None:  # the first prompt token: nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(clamp(entry.get(token_id, -math.inf)))
                out["top_logprobs"].append({self.texts(t): clamp(lp) for t, lp in _top(entry, token_id, self.num_top)})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def prompt_logprobs_json(
    token_ids: list[int], entries: list[dict[int, float] | None], num_top: int, texts: TokenTexts
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or its entry and the top `num_top`, keyed by token
    id. `rank` is the place among the top `num_top` (1 = most likely), null for a prompt token outside them."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            out.append(None)
            continue
        top = _top(entry, token_id, num_top)
        ranks = {t: rank for rank, (t, _) in enumerate(top, 1)}
        shown = [(token_id, entry.get(token_id, -math.inf)), *((t, lp) for t, lp in top if t != token_id)]
        out.append({str(t): {"logprob": clamp(lp), "rank": ranks.get(t), "decoded_token": texts(t)} for t, lp in shown})
    return out
