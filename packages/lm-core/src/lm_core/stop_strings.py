"""Stop strings matched on streamed text, across token boundaries.

Text that could be the beginning of a stop string is held back until it either completes the stop string or
stops matching; everything else is released at once.

When stop strings overlap, the one completed first wins: generation is aborted on the first match, so a stop
string that would only complete later never gets the text it needs, and the outcome must not depend on how the
text was split into deltas. Two stop strings can complete at the same character only when one is a suffix of the
other ("end" and "the end"); then the longer one, which starts earlier, wins, so that the output is cut before
all of the stop text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast


class StopStringMatcher:
    """Feed text deltas; get back what is safe to emit and, once, the stop string that matched.

    `stop` may also be a single string. With `include_stop_str_in_output`, the matched stop string is part of
    the final returned text; otherwise the output ends right before it.
    """

    def __init__(self, stop: Sequence[str] | str, include_stop_str_in_output: bool = False) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in cast(list[object], stops):
            if not isinstance(s, str):
                raise ValueError(f"stop: stop strings must be str, got {type(s).__name__}")
            if not s:
                raise ValueError("stop: stop strings must not be empty")
        # Longest first, so that among matches ending at the same character the first one found is the longest.
        self.stop: tuple[str, ...] = tuple(sorted(dict.fromkeys(stops), key=len, reverse=True))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: str | None = None
        self._held = ""
        self._closed = False

    @property
    def finished(self) -> bool:
        """True once a stop string has matched: the request should be aborted."""
        return self.matched is not None

    @property
    def held(self) -> str:
        """Text held back because it may be the beginning of a stop string."""
        return self._held

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the matched stop string or None)."""
        if self.finished or self._closed:
            raise RuntimeError("StopStringMatcher.feed() after a match or flush()")
        text = self._held + delta
        if not self.stop:
            return text, None
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched, self._held = stop, ""
            end = start + len(stop) if self.include_stop_str_in_output else start
            return text[:end], stop
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Return the held-back text when generation ends without a match; the matcher takes no more text."""
        self._closed = True
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        best_end = len(text) + 1
        for stop in self.stop:
            start = text.find(stop)
            # Strictly earlier ends only: `self.stop` is longest first, so ties keep the longest.
            if start >= 0 and start + len(stop) < best_end:
                best, best_end = (start, stop), start + len(stop)
        return best

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
