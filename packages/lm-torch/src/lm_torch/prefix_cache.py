"""The prefix cache: full KV blocks indexed by a hash chain over their token ids, and the LRU of evictable ones.

Keys. Block `i` of a sequence (tokens `[i * B, (i + 1) * B)`) has the key
`blake2b(key(i - 1) || token ids of block i)`, with `key(-1)` derived from the sequence's cache salt. A key therefore
names the whole prefix up to the end of its block, so equal keys mean equal prefixes and the same KV. Lookups do not
trust the digest alone: they also compare the block's token ids and its parent's key, so a false hit needs a 128-bit
BLAKE2b collision, which nobody can produce on purpose (unlike Python's `hash`, which prompts could be crafted against).

Only full blocks whose KV is completely computed are ever inserted, and a cached block is never written again: new
tokens always go to blocks of their own. A block in the cache is either used (ref count > 0, owned by the block
manager's callers) or evictable (ref count 0, kept in LRU order here until its space is needed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

_DIGEST_SIZE = 16


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a sequence's first block: sequences with different salts share nothing."""
    if cache_salt is None:
        return b""
    return hashlib.blake2b(b"salt:" + cache_salt.encode(), digest_size=_DIGEST_SIZE).digest()


def hash_block(parent_key: bytes, token_ids: SequenceABC[int]) -> bytes:
    """The key of a full block whose parent (the previous block of the same sequence) has `parent_key`."""
    h = hashlib.blake2b(parent_key, digest_size=_DIGEST_SIZE)
    # 8 bytes a token id: unambiguous, so two different token lists never feed the same bytes to the digest.
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(frozen=True)
class CachedBlock:
    """What the cache knows of one physical block: its key, its parent's key and its token ids."""

    key: bytes
    parent_key: bytes
    token_ids: tuple[int, ...]


class PrefixCache:
    """Maps keys to physical block ids; tracks which cached blocks are evictable, least recently used first."""

    def __init__(self) -> None:
        self._block_by_key: dict[bytes, int] = {}
        self._entries: dict[int, CachedBlock] = {}
        # Cached blocks with ref count 0. Insertion order is release order, so popping the first evicts the block
        # released longest ago; sequences release their blocks last-to-first, so a prefix's tail goes before its head.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._entries

    @property
    def num_evictable(self) -> int:
        """Cached blocks that no sequence holds (ref count 0), reusable by eviction."""
        return len(self._evictable)

    def is_evictable(self, block_id: int) -> bool:
        """Whether `block_id` is cached and held by no sequence."""
        return block_id in self._evictable

    def lookup(self, key: bytes, parent_key: bytes, token_ids: SequenceABC[int]) -> int | None:
        """The block cached under `key`, only if its parent key and token ids are exactly these."""
        block_id = self._block_by_key.get(key)
        if block_id is None:
            return None
        entry = self._entries[block_id]
        if entry.parent_key != parent_key or entry.token_ids != tuple(token_ids):
            return None
        return block_id

    def insert(self, block_id: int, key: bytes, parent_key: bytes, token_ids: SequenceABC[int]) -> bool:
        """Register a used, fully computed block. False (nothing changes) if the key or the block is already cached:
        the first copy of a prefix stays the shared one and the duplicate stays private to its sequence."""
        if key in self._block_by_key or block_id in self._entries:
            return False
        self._block_by_key[key] = block_id
        self._entries[block_id] = CachedBlock(key, parent_key, tuple(token_ids))
        return True

    def release(self, block_id: int) -> None:
        """A cached block's ref count dropped to 0: it becomes the most recently used evictable block."""
        assert block_id in self._entries and block_id not in self._evictable
        self._evictable[block_id] = None

    def touch(self, block_id: int) -> None:
        """An evictable block was reused by a prefix hit: it is in use again, so no longer evictable."""
        del self._evictable[block_id]

    def evict(self) -> int:
        """Forget the least recently used evictable block and return its id, now free to overwrite."""
        block_id, _ = self._evictable.popitem(last=False)
        self._forget(block_id)
        return block_id

    def num_used_cached(self) -> int:
        """Cached blocks that at least one sequence holds."""
        return len(self._entries) - len(self._evictable)

    def clear(self) -> list[int]:
        """Forget every block, which must all be evictable; returns their ids (now plain free blocks)."""
        assert self.num_used_cached() == 0, "cannot clear the prefix cache while cached blocks are in use"
        freed = list(self._evictable)
        self._evictable.clear()
        self._entries.clear()
        self._block_by_key.clear()
        return freed

    def _forget(self, block_id: int) -> None:
        entry = self._entries.pop(block_id)
        del self._block_by_key[entry.key]
