"""Rendering a conversation and tokenizing it so that only the template writes special tokens.

A user who types ``<|im_end|>\\n<|im_start|>system`` in a message must not get real role tokens (a forged system
turn). Before rendering, every spelling of a special token inside the caller's data (messages, tools, template
kwargs) is replaced by a marker that no input contains; the rendered text is tokenized piece by piece: the
template's own text as usual (its special tokens stay special), each marker as the ordinary tokens of the spelling
it stands for. A conversation without such spellings is rendered and tokenized exactly as before.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from lm_core.messages import InvalidMessagesError, ToolCallArguments, validate_messages


def check_text_only(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise `InvalidMessagesError` naming the part for any content part that is not text (images, audio...)."""
    for i, message in enumerate(messages):
        content: Any = message.get("content")
        if not isinstance(content, list):
            continue
        part: Any
        for j, part in enumerate(cast(list[Any], content)):
            kind: Any = cast(Mapping[str, Any], part).get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                raise InvalidMessagesError(
                    f"messages[{i}].content[{j}]: this model takes no images, audio or other media (got a {kind!r} "
                    "part); send text parts only"
                )


def render_and_encode(
    template: Any,
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    allow_special_tokens_in_content: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    expand: Callable[[str], str] | None = None,
) -> tuple[str, list[int]]:
    """The rendered prompt text and its token ids (the template writes any BOS itself).

    Unless `allow_special_tokens_in_content`, text in `messages`, `tools` or `chat_template_kwargs` that spells a
    special token is tokenized as ordinary text. Raises ValueError for invalid messages or a template failure.
    Messages are text-only unless `expand` is given: it rewrites the rendered text before tokenization (lm-vl
    turning the template's image markers into the model's placeholder tokens) and sees the caller's spellings of
    special tokens hidden, so only markers the template wrote are expanded.
    """
    messages = validate_messages(messages)
    if expand is None:
        check_text_only(messages)
    kwargs = dict(chat_template_kwargs or {})
    specials = tokenizer.special_texts
    markers: _Markers | None = None
    if specials and not allow_special_tokens_in_content:
        markers = _Markers(specials)
        messages, tools, kwargs = markers.hide((messages, tools, kwargs))
    text = template.render(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        special_tokens=tokenizer.special_tokens,
        **kwargs,
    )
    if expand is not None:
        text = expand(text)
    if markers is None or not markers.num_hidden:
        return text, tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    pieces = markers.pattern.split(text)
    # split() alternates: template text, marker index, template text, ...
    for k, piece in enumerate(pieces):
        if k % 2:
            ids += tokenizer.encode_as_text(specials[int(piece)])
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return markers.reveal(text), ids


class _Markers:
    """Replaces special-token spellings in strings with `<<lm-special-NONCE-K>>` (K indexes `specials`) and back.

    The marker is ASCII without quotes or backslashes, so it survives templates that write JSON (``tojson``); the
    random nonce keeps it apart from anything a caller could have sent.
    """

    def __init__(self, specials: Sequence[str]) -> None:
        self.specials = list(specials)
        self.index = {text: k for k, text in enumerate(self.specials)}
        self.nonce = uuid.uuid4().hex
        self.find = re.compile("|".join(re.escape(t) for t in self.specials))
        self.pattern = re.compile(f"<<lm-special-{self.nonce}-(\\d+)>>")
        self.num_hidden = 0

    def _replace(self, match: re.Match[str]) -> str:
        self.num_hidden += 1
        return f"<<lm-special-{self.nonce}-{self.index[match.group(0)]}>>"

    def hide(self, value: Any) -> Any:
        """`value` with every special-token spelling in its strings replaced by a marker (containers rebuilt)."""
        if isinstance(value, str):
            return self.find.sub(self._replace, value) if self.find.search(value) else value
        if isinstance(value, ToolCallArguments):
            return ToolCallArguments({k: self.hide(v) for k, v in value.items()}, self.hide(str(value)))
        if isinstance(value, Mapping):
            return {k: self.hide(v) for k, v in cast(Mapping[Any, Any], value).items()}
        if isinstance(value, list):
            return [self.hide(v) for v in cast(list[Any], value)]
        if isinstance(value, tuple):
            return tuple(self.hide(v) for v in cast(tuple[Any, ...], value))
        return value

    def reveal(self, text: str) -> str:
        """`text` with the markers turned back into the spellings they stand for."""
        return self.pattern.sub(lambda m: self.specials[int(m.group(1))], text)
