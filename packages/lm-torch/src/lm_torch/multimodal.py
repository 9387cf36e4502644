"""Images and videos in the engine: the items of a request and the rules that keep their spans whole.

A request's `EngineRequest.multimodal` entries (lm-core's `MultimodalItem` dicts) become `MMItem`s: a span of
placeholder tokens `[offset, offset + length)` that the vision tower's output for the item fills, its pixels and
metadata, and a content hash. Three rules follow from the span, each applied in one place:
- a prefill chunk never ends inside a span (`clamp_chunk`): the tower's output for an item is scattered whole;
- a prefix-cache hit never ends inside a span (`clamp_prefix`), for the same reason;
- the prefix-cache key of a block that overlaps a span includes the item's content hash (`block_extras`), so the same
  image behind the same placeholder tokens hits and a different image misses.
`EncoderCache` keeps recent vision-tower outputs by content hash, so a second turn about the same image (or a
preempted request's recomputation) does not run the tower again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Hex digits of a content hash folded into one int of a block's prefix-cache content (60 bits: a signed int64).
_HASH_DIGITS_PER_INT = 15
# Marks the start of an item's hash in a block's content; never a token id.
_ITEM_MARK = -1


@dataclass(frozen=True, eq=False)
class MMItem:
    """One image or video of a request (see the module docstring). `pixel_values` and `meta` are the family's."""

    modality: str
    offset: int
    length: int
    content_hash: str
    pixel_values: Any = field(repr=False)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """One past the span's last placeholder token."""
        return self.offset + self.length

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> MMItem:
        """An `EngineRequest.multimodal` entry (checked by `lm_core.multimodal.check_items`)."""
        return cls(
            str(entry["modality"]),
            int(entry["offset"]),
            int(entry["length"]),
            str(entry["content_hash"]),
            entry["pixel_values"],
            dict(entry.get("meta") or {}),
        )


def clamp_chunk(items: Sequence[MMItem], start: int, num_new: int) -> int:
    """`num_new` tokens from `start` cut back to end before the span they would end inside, or, when `start` is that
    span's first token, extended to the span's end (a span is computed in one step even past the token budget)."""
    end = start + num_new
    for item in items:
        if item.offset < end < item.end:
            return item.offset - start if item.offset > start else item.end - start
        if item.offset >= end:
            break
    return num_new


def clamp_to_encoder_budget(items: Sequence[MMItem], start: int, num_new: int, budget: int, first: bool) -> int:
    """`num_new` tokens from `start` (already span-safe) cut before the first item whose placeholders would take the
    step's encoder work past `budget` (placeholder tokens of items computed this step). `first`: nothing in the step
    has used the budget yet, so one item larger than the whole budget still goes (every item gets its turn)."""
    end, used = start + num_new, 0
    for item in items:
        if item.offset >= end:
            break
        if item.end <= start:
            continue
        if used + item.length > budget and not (first and used == 0):
            return item.offset - start
        used += item.length
    return num_new


def encoder_tokens(items: Sequence[MMItem], start: int, num_new: int) -> int:
    """Placeholder tokens of the items whose spans lie in `[start, start + num_new)` (the tower's work for them)."""
    end = start + num_new
    return sum(item.length for item in items if item.offset >= start and item.end <= end)


def chunk_for(items: Sequence[MMItem], start: int, num_new: int, encoder_budget: int | None, first: bool) -> int:
    """A chunk of at most `num_new` tokens from `start` that splits no span (`clamp_chunk`) and, with an
    `encoder_budget` left in the step, encodes no more placeholder tokens than it (`clamp_to_encoder_budget`)."""
    num_new = clamp_chunk(items, start, num_new)
    if encoder_budget is not None:
        num_new = clamp_to_encoder_budget(items, start, num_new, encoder_budget, first)
    return num_new


def clamp_prefix(items: Sequence[MMItem], num_blocks: int, block_size: int) -> int:
    """Of `num_blocks` leading cached blocks, how many a sequence may take: none that would end its cached prefix
    inside a span (the span's KV must be computed from the tower's output in one step, with its placeholders)."""
    cached = num_blocks * block_size
    for item in items:
        if item.offset < cached < item.end:
            return item.offset // block_size
        if item.offset >= cached:
            break
    return num_blocks


def block_extras(items: Sequence[MMItem], index: int, block_size: int) -> list[int]:
    """What block `index`'s prefix-cache content holds besides its token ids: each overlapping item's content hash
    (as ints after a marker), so that equal placeholder tokens over different images are different blocks."""
    first, last = index * block_size, (index + 1) * block_size
    extras: list[int] = []
    for item in items:
        if item.offset < last and item.end > first:
            digest = item.content_hash
            extras.append(_ITEM_MARK)
            extras += [
                int(digest[k : k + _HASH_DIGITS_PER_INT], 16) for k in range(0, len(digest), _HASH_DIGITS_PER_INT)
            ]
        elif item.offset >= last:
            break
    return extras


class EncoderCache:
    """Recent vision-tower outputs by content hash, least recently used evicted first, bounded by rows (tokens)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._num_tokens = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> Any:
        """The cached output ([tokens, hidden]) or None; a hit becomes the most recently used."""
        value = self._entries.get(content_hash)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self.hits += 1
        return value

    def put(self, content_hash: str, embeddings: Any) -> None:
        """Keep `embeddings` ([tokens, hidden]); an output larger than the whole cache is not kept."""
        rows = int(embeddings.shape[0])
        if rows > self.max_tokens or content_hash in self._entries:
            return
        while self._entries and self._num_tokens + rows > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self._num_tokens -= int(old.shape[0])
        self._entries[content_hash] = embeddings
        self._num_tokens += rows
