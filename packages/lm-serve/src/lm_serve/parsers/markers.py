"""Finding a tag in streamed text, and what to hold back while the tail might still become one.

Every parser holds back exactly a *tag-start*: the trailing run of whitespace plus the longest suffix that is a
proper prefix of the tag (`"\\n\\n<tool_c"` while `<tool_call>` is the tag). The whitespace belongs to the tag
because models put a newline or two before their markup, and a message of calls should not come back with
content `"\\n"`; when no tag follows, the whitespace is released unchanged.
"""

from __future__ import annotations

import re


def match_length(pattern: re.Pattern[str], text: str, pos: int = 0) -> int:
    """Characters `pattern` matches in `text` at `pos` (0 when it does not match there)."""
    match = pattern.match(text, pos)
    return match.end() - pos if match else 0


class TagSplitter:
    """Splits streamed text at the first `tag`, releasing everything that cannot be part of `\\s*tag`.

    The held whitespace is kept as a list of pieces, apart from the text that is searched again on the next
    push, so that a degenerate stream of whitespace costs linear time, not quadratic.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._whitespace: list[str] = []  # the held run of whitespace
        self._partial = ""  # after it, a held proper prefix of the tag (tags hold no whitespace)

    def push(self, text: str, final: bool = False) -> tuple[str, str | None, str]:
        """Adds `text`; returns (released text, the whitespace before the tag or None if no tag yet, text after it).

        When `final`, nothing is held: without a tag everything is released.
        """
        buf, self._partial = self._partial + text, ""
        at = buf.find(self.tag)
        if at >= 0:
            before = buf[:at]
            kept = before.rstrip()
            if kept:
                released, whitespace = "".join(self._whitespace) + kept, before[len(kept) :]
            else:
                released, whitespace = "", "".join(self._whitespace) + before
            self._whitespace = []
            return released, whitespace, buf[at + len(self.tag) :]
        if final:
            released, self._whitespace = "".join(self._whitespace) + buf, []
            return released, None, ""
        end = partial_tag_start(buf, self.tag)
        self._partial = buf[end:]
        kept = buf[:end].rstrip()
        if not kept:
            self._whitespace.append(buf[:end])
            return "", None, ""
        released = "".join(self._whitespace) + kept
        self._whitespace = [buf[len(kept) : end]]
        return released, None, ""


def partial_tag_start(text: str, tag: str) -> int:
    """Start of the longest suffix of `text` that is a proper, non-empty prefix of `tag` (`len(text)` if none)."""
    first = tag[0]
    for start in range(max(0, len(text) - len(tag) + 1), len(text)):
        if text[start] == first and tag.startswith(text[start:]):
            return start
    return len(text)


def skip_whitespace(text: str, start: int = 0) -> int:
    """Index of the first non-whitespace character at or after `start` (`len(text)` if none)."""
    return len(text) - len(text[start:].lstrip())


def is_proper_prefix(text: str, tag: str) -> bool:
    """True when `text` is a non-empty start of `tag` that is not yet all of it."""
    return 0 < len(text) < len(tag) and tag.startswith(text)
