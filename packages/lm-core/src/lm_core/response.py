"""`Response`: what the pipeline returns for one generated sequence (whole, or one streamed piece of it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_core.engine import FinishReason


@dataclass
class Response:
    """One generated sequence, or, when streamed, the piece of it new since the previous `Response`.

    In a stream `text`, `token_ids` and `logprobs` are deltas, while `generate_token_len` counts all tokens
    generated so far; `finish_reason` is set on the last piece only. `index` tells the sequences of a batch apart:
    prompt `p` with `n` samples gives indices `p * n` to `p * n + n - 1`. `prompt_logprobs` (when asked for) is whole,
    on one piece: per prompt token, None for the first, then {token id: log-probability} of that token and the top N.

    `num_hidden_tokens` counts the trailing `token_ids` that have no text: the EOS or stop id that ended the sequence
    (unless `include_stop_str_in_output`, or a stop string ended it). `visible_token_ids` are the others, the tokens
    whose text is in `text` (and whose logprobs a server reports).
    """

    text: str
    token_ids: list[int] = field(default_factory=list[int])
    input_token_len: int = 0
    generate_token_len: int = 0
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    index: int = 0
    stop_str: str | None = None
    error: str | None = None
    num_hidden_tokens: int = 0

    @property
    def visible_token_ids(self) -> list[int]:
        """`token_ids` without the trailing hidden ones (the stop token that ended the sequence, when hidden)."""
        return self.token_ids[: len(self.token_ids) - self.num_hidden_tokens]

    def extend(self, piece: Response) -> None:
        """Append a streamed piece to this (accumulating) response."""
        self.text += piece.text
        self.token_ids.extend(piece.token_ids)
        self.generate_token_len = piece.generate_token_len
        self.input_token_len = piece.input_token_len
        if piece.logprobs is not None:
            self.logprobs = (self.logprobs or []) + piece.logprobs
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.stop_str = piece.stop_str or self.stop_str
        self.error = piece.error or self.error
        # Only a sequence's last piece can end with a hidden token.
        self.num_hidden_tokens = piece.num_hidden_tokens
