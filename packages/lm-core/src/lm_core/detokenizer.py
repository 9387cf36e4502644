"""Streaming detokenization: text deltas that add up to exactly `Tokenizer.decode` of the generated ids.

Each step decodes a short window: `context + ids[cut:]`. `cut` is a settled boundary (no later token can change
the text before it) and `context` is the last token before `cut` that the decode keeps. The context is there for
decoders that treat the first token specially (SentencePiece's "▁word" loses its space at the start of a
decode); its text was emitted long ago and only serves to locate the new text.

Two things can still change text the window already shows, and are held back until they settle:

* a trailing U+FFFD, which may be an incomplete UTF-8 sequence of byte-level tokens (at most one such character:
  every other character of a UTF-8 decode is final);
* a trailing run of byte-fallback pieces (`<0xE6>`), because the ByteFallback decoder turns a whole run into
  U+FFFDs when any byte of it is invalid, so even a valid prefix of a run may change until the run ends.

A step therefore decodes its new ids plus a few settled ones; a long byte-fallback run is decoded once, when it
ends, and a U+FFFD that can no longer change is released as soon as text follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lm_core.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# An incomplete UTF-8 sequence spans at most three byte-level tokens, so once this many tokens are pending behind
# a trailing U+FFFD, an earlier boundary is looked for among the last _CUT_SEARCH ones.
_MAX_PENDING = 4
_CUT_SEARCH = 8


class IncrementalDetokenizer:
    """Turns generated ids into text deltas; `"".join(steps) + finish() == tokenizer.decode(token_ids, ...)`.

    The reference is the decode of the generated ids alone, so `prompt_ids` do not change the text: as context
    they would give the first generated "▁word" a leading space that the full decode does not have. They are
    accepted so that callers need not special-case tokenizers.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self._byte_ids = tokenizer.byte_token_ids
        # Tokens the decode drops entirely: they neither end a byte run nor can serve as context.
        self._skipped: frozenset[int] = tokenizer.skipped_ids if skip_special_tokens else frozenset[int]()
        self._context: list[int] = []
        self._cut = 0
        self._emitted = 0  # characters of the window's text already emitted (context text included)
        self._last_kept = -1  # index of the latest token the decode keeps
        self._run_from: int | None = None  # start of the trailing byte-fallback run (skipped tokens included)
        self._run_has_byte = False
        self._kept_before_run = -1
        self._chunks: list[str] = []
        self._text: str | None = ""
        self._finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they settle (possibly "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.step() after finish()")
        new = list(new_token_ids)
        if not new:
            return ""
        held_run = self._run_from if self._run_has_byte else None
        self._observe(new)
        if held_run is not None and self._run_from == held_run:
            # Still inside the run held back last step, so nothing can settle: skipping the decode keeps a long run
            # linear overall instead of quadratic.
            return ""
        return self._emit(self._advance())

    def finish(self) -> str:
        """Return whatever is still held back; the stream is then complete."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode_window(len(self.token_ids))
        return self._emit(text[self._emitted :])

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _decode_window(self, end: int) -> str:
        return self._decode(self._context + self.token_ids[self._cut : end])

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def _observe(self, new: list[int]) -> None:
        offset = len(self.token_ids)
        self.token_ids.extend(new)
        for index, token_id in enumerate(new, offset):
            is_byte = token_id in self._byte_ids
            skipped = token_id in self._skipped
            if is_byte or (skipped and self._run_from is not None):
                if self._run_from is None:
                    self._run_from, self._kept_before_run = index, self._last_kept
                self._run_has_byte = self._run_has_byte or is_byte
            elif skipped and self._byte_ids:
                # A skipped token may sit inside a run (the decode joins the bytes around it), so it opens one.
                self._run_from, self._run_has_byte, self._kept_before_run = index, False, self._last_kept
            else:
                self._run_from, self._run_has_byte = None, False
            if not skipped:
                self._last_kept = index

    def _advance(self) -> str:
        """Decode the window, return its newly settled text and move the cut past what has settled."""
        n = len(self.token_ids)
        text = self._decode_window(n)
        cut: tuple[int, int, int] | None  # (boundary, length of the window's text before it, last kept before it)
        if self._run_from is not None and self._run_has_byte:
            head_len = len(self._decode_window(self._run_from))
            settled, cut = head_len, (self._run_from, head_len, self._kept_before_run)
        elif not text.endswith(_REPLACEMENT):
            settled, cut = len(text), (n, len(text), self._last_kept)
        else:
            settled, cut = len(text) - 1, None
            if n - self._cut > _MAX_PENDING:
                cut = self._find_cut(text, n)
        delta = text[self._emitted : settled]
        self._emitted = max(self._emitted, settled)
        if cut is not None and cut[0] > self._cut:
            self._move_cut(*cut)
        return delta

    def _find_cut(self, text: str, n: int) -> tuple[int, int, int] | None:
        """The latest boundary q whose text is final: decoding `ids[q:n]` on its own gives the same text as
        decoding it after the window's earlier ids, so no byte sequence is still open across q."""
        for q in range(n - 1, max(self._cut, n - _CUT_SEARCH), -1):
            before = self.token_ids[q - 1]
            if self._byte_ids and (before in self._byte_ids or before in self._skipped):
                continue
            head = self._decode_window(q)
            if not text.startswith(head):
                continue
            tail, alone = text[len(head) :], self._decode(self.token_ids[q:n])
            # On its own, `ids[q]` may lose a SentencePiece leading space; that is not a sign of an open sequence.
            if alone and tail in (alone, " " + alone):
                kept = q - 1
                while kept >= 0 and self.token_ids[kept] in self._skipped:
                    kept -= 1
                return q, len(head), kept
        return None

    def _move_cut(self, cut: int, head_len: int, kept: int) -> None:
        """Settle everything before `cut`; its last kept token becomes the context."""
        # Skipped ids between `kept` and `cut` do not reach the decoder, so one kept token is all the context
        # needed; with none at all, nothing precedes `cut` in the decode either.
        self._context = [self.token_ids[kept]] if kept >= 0 else []
        self._emitted = len(self._decode(self._context)) + (self._emitted - head_len)
        self._cut = cut
