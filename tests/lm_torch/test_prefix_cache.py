"""PrefixCache: hash-chain keys, exact verification on lookup, LRU eviction of released blocks."""

from __future__ import annotations

import pytest

from lm_torch.prefix_cache import PrefixCache, hash_block, root_key


def test_keys_chain_over_the_whole_prefix():
    root = root_key(None)
    a = hash_block(root, [1, 2, 3, 4])
    assert a == hash_block(root, [1, 2, 3, 4]) and len(a) == 16
    # Same block tokens after a different parent: a different key (the key names the whole prefix).
    assert hash_block(hash_block(root, [9, 9, 9, 9]), [1, 2, 3, 4]) != hash_block(a, [1, 2, 3, 4])
    assert hash_block(root, [1, 2, 3, 4]) != hash_block(root, [1, 2, 3, 5])
    # A salt separates otherwise equal prefixes (adapters, images behind placeholder tokens).
    assert hash_block(root_key("lora-a"), [1, 2]) != hash_block(root, [1, 2])
    assert root_key("a") != root_key("b")


def test_lookup_verifies_tokens_and_parent_not_only_the_key():
    cache = PrefixCache()
    root = root_key(None)
    key = hash_block(root, [1, 2])
    assert cache.insert(7, key, root, [1, 2])
    assert cache.lookup(key, root, [1, 2]) == 7
    # A colliding key whose tokens or parent differ is a miss.
    assert cache.lookup(key, root, [1, 3]) is None
    assert cache.lookup(key, b"other-parent", [1, 2]) is None
    assert cache.lookup(hash_block(root, [5, 6]), root, [5, 6]) is None


def test_duplicates_are_refused():
    cache = PrefixCache()
    root = root_key(None)
    key = hash_block(root, [1, 2])
    assert cache.insert(0, key, root, [1, 2])
    assert not cache.insert(1, key, root, [1, 2])  # same prefix, another block: stays private
    assert not cache.insert(0, hash_block(root, [3, 4]), root, [3, 4])  # block already cached under another key
    assert len(cache) == 1 and 0 in cache and 1 not in cache


def test_lru_eviction_order_and_touch():
    cache = PrefixCache()
    root = root_key(None)
    keys = {b: hash_block(root, [b]) for b in range(4)}
    for b in range(4):
        cache.insert(b, keys[b], root, [b])
    for b in (2, 0, 3, 1):
        cache.release(b)
    assert cache.num_evictable == 4 and cache.num_used_cached() == 0
    cache.touch(0)  # reused by a prefix hit: in use, not evictable
    assert not cache.is_evictable(0) and cache.num_used_cached() == 1
    assert cache.evict() == 2  # least recently released first
    assert 2 not in cache and cache.lookup(keys[2], root, [2]) is None
    cache.release(0)  # released again: now the most recent
    assert [cache.evict() for _ in range(3)] == [3, 1, 0]
    assert len(cache) == 0


def test_clear_needs_every_block_evictable():
    cache = PrefixCache()
    root = root_key(None)
    cache.insert(0, hash_block(root, [1]), root, [1])
    with pytest.raises(AssertionError):
        cache.clear()
    cache.release(0)
    assert cache.clear() == [0] and len(cache) == 0 and cache.num_evictable == 0
