"""`<think>...</think>` reasoning: DeepSeek-R1 (and its distills), QwQ, Qwen3 with thinking on and off.

Where the reasoning starts depends on the chat template, so the parser reads the end of the rendered prompt:

- the prompt ends with `<think>` (DeepSeek-R1's current template, QwQ, Qwen3 when a template forces thinking):
  the output starts inside the reasoning, with no opening tag;
- the prompt ends with `</think>` (Qwen3 with `enable_thinking=False` renders an empty `<think>\\n\\n</think>`,
  DeepSeek-V3.1 with `thinking=False`), or the request turned thinking off in `chat_template_kwargs`: the output
  is all content;
- otherwise the output itself tells: reasoning if it opens with `<think>`; if not, `think`/`qwen3` read it as
  content, while `deepseek-r1`/`qwen-qwq` read it as reasoning (those models always reason first, and with older
  templates they sometimes leave out the opening tag).

Reasoning ends at `</think>`; a stream that ends before it is all reasoning. Whitespace just inside the tags
and just after `</think>` is formatting (Qwen3's own template strips it when it renders the message again) and is
dropped. A `<think>` or `</think>` inside the content is content.
"""

from __future__ import annotations

from lm_serve.parsers.base import ReasoningParser
from lm_serve.parsers.markers import TagSplitter, is_proper_prefix, skip_whitespace

_START = "start"  # the output's first characters may be "<think>"
_REASONING = "reasoning"
_CONTENT_START = "content_start"  # just after "</think>": whitespace to drop
_CONTENT = "content"


class ThinkReasoningParser(ReasoningParser):
    """`<think>` reasoning; output that does not open with the tag is content (Qwen3, generic)."""

    start_tag = "<think>"
    end_tag = "</think>"
    #: What an output that does not open with `<think>` is, when the prompt does not say.
    starts_in_reasoning = False

    def __init__(self, prompt_text: str | None = None, chat_template_kwargs: dict | None = None) -> None:
        super().__init__(prompt_text, chat_template_kwargs)
        kwargs = self.chat_template_kwargs
        prompt_tail = (prompt_text or "").rstrip()
        self._is_reasoning_default = self.starts_in_reasoning
        is_thinking_off = kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False
        if is_thinking_off or prompt_tail.endswith(self.end_tag):
            self._state = _CONTENT
        else:
            self._state = _START
            self._is_reasoning_default = self.starts_in_reasoning or prompt_tail.endswith(self.start_tag)
        self._buf = ""
        self._leading: list[str] = []  # whitespace before a possible "<think>"
        self._end_splitter = TagSplitter(self.end_tag)
        self._is_reasoning_stripped = False  # leading whitespace of the reasoning was dropped
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def feed(self, text: str) -> tuple[str, str]:
        """Takes the next piece of generated text; returns the new (reasoning, content)."""
        self._buf += text
        while self._step(final=False):
            pass
        return self._flush()

    def finish(self) -> tuple[str, str]:
        """End of generation: what is held is released (inside the reasoning, as reasoning)."""
        while self._step(final=True):
            pass
        return self._flush()

    def _flush(self) -> tuple[str, str]:
        out = "".join(self._reasoning), "".join(self._content)
        self._reasoning, self._content = [], []
        return out

    def _step(self, final: bool) -> bool:
        buf, state = self._buf, self._state
        if state == _CONTENT:
            self._content.append(buf)
            self._buf = ""
            return False
        if state == _CONTENT_START:
            self._buf = buf[skip_whitespace(buf) :]
            if not self._buf:
                return False
            self._state = _CONTENT
            return True
        if state == _START:
            rest = buf.lstrip()
            self._leading.append(buf[: len(buf) - len(rest)])
            self._buf = rest
            if rest.startswith(self.start_tag):
                self._buf = rest[len(self.start_tag) :]
                self._state = _REASONING
            elif not final and (not rest or is_proper_prefix(rest, self.start_tag)):
                return False
            elif self._is_reasoning_default:
                self._state = _REASONING  # whose leading whitespace is dropped anyway
            else:
                self._content.append("".join(self._leading))
                self._state = _CONTENT
            self._leading = []
            return True
        # _REASONING
        if not self._is_reasoning_stripped:
            self._buf = buf = buf[skip_whitespace(buf) :]
            if not buf:
                return False
            self._is_reasoning_stripped = True
        released, whitespace, rest = self._end_splitter.push(buf, final)
        self._reasoning.append(released)
        self._buf = rest
        if whitespace is None:
            return False
        self._state = _CONTENT_START
        return True


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1 and QwQ: the output is reasoning until `</think>`, with or without an opening `<think>`."""

    starts_in_reasoning = True
