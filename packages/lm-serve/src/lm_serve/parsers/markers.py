"""Finding a tag in streamed text, and what to hold back while the tail might still become one.

Every parser holds back exactly a *tag-start*: the trailing run of whitespace plus the longest suffix that is a
proper prefix of the tag (`"\\n\\n<tool_c"` while `<tool_call>` is the tag). The whitespace belongs to the tag
because models put a newline or two before their markup, and a message of calls should not come back with
content `"\\n"`; when no tag follows, the whitespace is released unchanged.
"""

from __future__ import annotations


def whitespace_start(text: str, end: int) -> int:
    """Where the run of whitespace that ends at `end` begins (`end` if `text[end - 1]` is not whitespace)."""
    start = end
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start


def partial_tag_start(text: str, tag: str) -> int:
    """Start of the longest suffix of `text` that is a proper, non-empty prefix of `tag` (`len(text)` if none)."""
    first = tag[0]
    for start in range(max(0, len(text) - len(tag) + 1), len(text)):
        if text[start] == first and tag.startswith(text[start:]):
            return start
    return len(text)


def held_start(text: str, tag: str) -> int:
    """Where the tag-start held back at the end of `text` begins: whitespace plus a partial `tag`."""
    return whitespace_start(text, partial_tag_start(text, tag))


def skip_whitespace(text: str, start: int = 0) -> int:
    """Index of the first non-whitespace character at or after `start` (`len(text)` if none)."""
    while start < len(text) and text[start].isspace():
        start += 1
    return start


def is_proper_prefix(text: str, tag: str) -> bool:
    """True when `text` is a non-empty start of `tag` that is not yet all of it."""
    return 0 < len(text) < len(tag) and tag.startswith(text)
