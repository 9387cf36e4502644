"""A thin wrapper over a transformers tokenizer: the pieces the engines, the chat templates and the streaming
detokenizer need, with one decode behaviour for all of them.

transformers is imported inside the functions that need it, so `import lm_core` stays light and torch-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, cast

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# SentencePiece-style byte-fallback pieces; the tokenizers ByteFallback decoder recognises them by this spelling.
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_generation_eos(path: str | os.PathLike[str]) -> list[int]:
    config = Path(path) / "generation_config.json"
    if not config.is_file():
        return []
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # A broken generation config should not make the tokenizer unusable; the tokenizer's own eos still applies.
        return []
    if not isinstance(data, dict):
        return []
    return _as_id_list(cast(dict[str, Any], data).get("eos_token_id"))


class Tokenizer:
    """A transformers tokenizer (`hf`) plus the eos ids of the model's generation config.

    `decode` never applies `clean_up_tokenization_spaces`: that clean-up rewrites text across token boundaries,
    so streamed text could not equal the full decode.
    """

    def __init__(self, hf: Any, *, generation_eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        eos = [*_as_id_list(getattr(hf, "eos_token_id", None)), *_as_id_list(generation_eos_token_ids)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load with `AutoTokenizer` from a model directory; its generation_config.json adds eos ids."""
        from transformers import AutoTokenizer

        hf = cast(Any, AutoTokenizer).from_pretrained(os.fspath(path))
        return cls(hf, generation_eos_token_ids=_read_generation_eos(path))

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence token id, if the tokenizer has one."""
        return getattr(self.hf, "bos_token_id", None)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens (`len(hf)`), i.e. one past the largest valid id."""
        return len(self.hf)

    @cached_property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops: the named specials and added tokens marked special."""
        ids: set[int] = set(getattr(self.hf, "all_special_ids", ()))
        for token_id, token in getattr(self.hf, "added_tokens_decoder", {}).items():
            if getattr(token, "special", False):
                ids.add(int(token_id))
        return frozenset(ids)

    @cached_property
    def skipped_ids(self) -> frozenset[int]:
        """The special ids that `decode(skip_special_tokens=True)` really drops, each checked by decoding it."""
        return frozenset(i for i in self.all_special_ids if self.decode([i], skip_special_tokens=True) == "")

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback pieces (`<0xE6>`): their text depends on the whole run of such pieces."""
        return frozenset(i for token, i in self.hf.get_vocab().items() if _BYTE_PIECE.fullmatch(token))

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template; of several named ones, the "default"."""
        template: object = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            template = cast(dict[str, object], template).get("default")
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """Texts of the named special tokens (bos_token, eos_token, ...) that this tokenizer defines."""
        found: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            value = getattr(self.hf, name, None)
            if value is not None:
                found[name] = str(value)
        return found

    def token_to_id(self, token: str) -> int | None:
        """The id of the single token spelled `token` (a special or added token, or a vocabulary entry), or None."""
        token_id = self.hf.convert_tokens_to_ids(token)
        unk = getattr(self.hf, "unk_token_id", None)
        if token_id is None or (token_id == unk and token != getattr(self.hf, "unk_token", None)):
            return None
        return int(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text` (with the tokenizer's own special tokens, such as BOS, when asked)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    @cached_property
    def special_texts(self) -> tuple[str, ...]:
        """Spellings that `encode` turns into one special token each (`<|im_start|>`, ...), longest first."""
        texts: set[str] = set(getattr(self.hf, "all_special_tokens", ()))
        for token in getattr(self.hf, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                texts.add(str(token))
        return tuple(sorted((t for t in texts if t), key=len, reverse=True))

    @cached_property
    def _splitting_backend(self) -> Any:
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer as BackendTokenizer

        # A copy: setting encode_special_tokens on the shared backend would race with other threads' encodes.
        copy = BackendTokenizer.from_str(backend.to_str())
        copy.encode_special_tokens = True
        return copy

    def encode_as_text(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text: spellings of special tokens become several ordinary tokens (no specials
        added). Safe to call from several threads."""
        backend = self._splitting_backend
        if backend is not None:
            # encode_batch releases the GIL (encode does not): a long text must not stall other threads.
            return list(backend.encode_batch([text], add_special_tokens=False)[0].ids)
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(
        self, token_ids: Sequence[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        """Text of `token_ids`; the reference that `IncrementalDetokenizer` streams exactly.

        `spaces_between_special_tokens` only affects Python ("slow") tokenizers; fast ones ignore it.
        """
        return self.hf.decode(
            list(token_ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=spaces_between_special_tokens,
        )

    def convert_ids_to_tokens(self, token_ids: int | Sequence[int]) -> str | list[str]:
        """Vocabulary strings of ids (e.g. "Ġworld", "▁world", "<0xE6>"), not their text."""
        if isinstance(token_ids, int):
            return self.hf.convert_ids_to_tokens(token_ids)
        return list(self.hf.convert_ids_to_tokens(list(token_ids)))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """The id of one token string, or the ids of several."""
        if isinstance(tokens, str):
            return self.hf.convert_tokens_to_ids(tokens)
        return list(self.hf.convert_tokens_to_ids(list(tokens)))
