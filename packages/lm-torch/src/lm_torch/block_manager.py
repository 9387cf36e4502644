"""`BlockManager`: the paged KV cache's bookkeeping (ref-counted blocks, prefix caching). No torch here.

The KV cache is `num_blocks` blocks of `block_size` token slots. Every block is in exactly one of three states:
- free: ref count 0 and not in the prefix cache; holds nothing anyone will read again;
- used: ref count > 0; owned by that many sequences' block tables. A ref count above 1 only happens for full, fully
  computed blocks shared through the prefix cache, which nobody writes again;
- evictable: ref count 0 but in the prefix cache (a finished or preempted sequence's full blocks), kept for future
  prefix hits and overwritten only when no free block is left (least recently released first).
So `free + used + evictable == num_blocks` always, and "free blocks" for allocation and usage means free + evictable.
"""

from __future__ import annotations

from collections import deque

from lm_torch.multimodal import block_extras, clamp_prefix
from lm_torch.prefix_cache import PrefixCache, hash_block, root_key
from lm_torch.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    """`a / b` rounded up, for non-negative `a` and positive `b`."""
    return -(-a // b)


class BlockManager:
    """Allocates, shares and frees the KV cache's blocks for sequences' block tables, with an optional prefix cache.

    Raises ValueError naming `num_blocks` or `block_size` when either is not an integer >= 1.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockManager.{name} must be an integer >= 1, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cache = PrefixCache()
        # Prefix-cache hit rate: prompt tokens found cached / prompt tokens looked up, at first admissions only.
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: the free ones plus the evictable cached ones."""
        return len(self._free) + self._cache.num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks owned by at least one sequence (evictable cached blocks count as free)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, used or evictable."""
        return len(self._cache)

    def ref_count(self, block_id: int) -> int:
        """How many sequences' block tables hold `block_id`."""
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether `block_id` is in the prefix cache (used or evictable)."""
        return block_id in self._cache

    def num_required_blocks(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return cdiv(num_tokens, self.block_size)

    def usage(self) -> float:
        """Fraction of blocks in use; evictable cached blocks count as free."""
        return self.num_used_blocks / self.num_blocks

    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens found cached over prompt tokens looked up, at first admissions only (0.0 before any)."""
        return self._num_hit_tokens / self._num_queried_tokens if self._num_queried_tokens else 0.0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only possible while no cached block is in use: False (and no change) if one is,
        since a shared block that is no longer cached would break "ref count > 1 only for cached blocks"."""
        if self._cache.num_used_cached():
            return False
        self._free.extend(self._cache.clear())
        return True

    # ---- prefix hits for a sequence being admitted ---------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold `seq`'s leading full blocks; changes nothing (except hashes kept on `seq`).

        The block holding the last token is never matched, even if full and cached: the model must compute at least
        that token to get logits, and it computes it into a block of the sequence's own, never into a shared one.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        keys = self._block_hashes(seq, max_blocks)
        parent = root_key(seq.cache_salt)
        matched: list[int] = []
        for i in range(max_blocks):
            block_id = self._cache.lookup(keys[i], parent, self._block_tokens(seq, i))
            if block_id is None:
                break
            matched.append(block_id)
            parent = keys[i]
        if seq.mm_items and matched:
            matched = matched[: clamp_prefix(seq.mm_items, len(matched), self.block_size)]
        return matched

    def can_allocate(self, cached_blocks: list[int], num_tokens: int) -> bool:
        """Whether a sequence that reuses `cached_blocks` (from `match_prefix`) can get blocks for its first
        `num_tokens` tokens. Reusing an evictable cached block takes it out of the free pool too."""
        num_new = self.num_required_blocks(num_tokens) - len(cached_blocks)
        num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        return max(num_new, 0) + num_revived <= self.num_free_blocks

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence with an empty block table the cached blocks of its prefix (see `match_prefix`); sets
        `block_table`, `num_computed_tokens` and `num_cached_tokens`. Takes no fresh block: `append_slots` does."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} already has blocks")
        matched = self.match_prefix(seq)
        for block_id in matched:
            if self._ref_counts[block_id] == 0:
                self._cache.touch(block_id)
            self._ref_counts[block_id] += 1
        seq.block_table = matched
        seq.num_committed_blocks = len(matched)
        seq.num_computed_tokens = len(matched) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        # A preempted sequence mostly hits its own released blocks: counting it again would inflate the rate.
        if self.enable_prefix_caching and seq.num_preemptions == 0:
            self._num_queried_tokens += seq.num_prompt_tokens
            self._num_hit_tokens += seq.num_cached_tokens

    # ---- growing, committing, releasing ----------------------------------------------------------------------------

    def num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` needs to compute `num_new_tokens` more tokens."""
        return max(self.num_required_blocks(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table), 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether enough free or evictable blocks exist for `seq` to compute `num_new_tokens` more tokens."""
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        """Ensure blocks for positions `[0, num_computed_tokens + num_new_tokens)`, taking free blocks first and
        evicting least recently released cached blocks after. False, and nothing changes, if there are not enough.
        `num_lookahead`: positions past the sequence's known and pending tokens a multi-token step computes."""
        if seq.num_computed_tokens + num_new_tokens > seq.num_tokens + seq.num_pending_tokens + num_lookahead:
            raise ValueError(
                f"sequence {seq.request_id!r} has {seq.num_tokens} tokens and {seq.num_pending_tokens} pending; "
                f"cannot compute {num_new_tokens} from {seq.num_computed_tokens}"
            )
        needed = self.num_blocks_to_append(seq, num_new_tokens)
        if needed == 0:  # most decode steps: the last block has room
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id = self._free.popleft() if self._free else self._cache.evict()
            self._ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence, num_computed: int | None = None) -> None:
        """After a step computed positions up to `num_computed` (default: `num_computed_tokens`): offer the sequence's
        newly full blocks of known tokens whose KV is written to the prefix cache. A block whose prefix is already
        cached (computed concurrently by another sequence) stays private; the chain goes on through its key, so later
        blocks are still shared."""
        done = seq.num_computed_tokens if num_computed is None else num_computed
        num_full = min(min(done, seq.num_tokens) // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or num_full <= seq.num_committed_blocks:
            return
        keys = self._block_hashes(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            parent = keys[i - 1] if i else root_key(seq.cache_salt)
            self._cache.insert(seq.block_table[i], keys[i], parent, self._block_tokens(seq, i))
        seq.num_committed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Last block first: the LRU then evicts a prefix's tail before its head, which
        keeps the heads (the parts other prompts are likeliest to share) cached longest."""
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} released more often than taken"
            if self._ref_counts[block_id] == 0:
                if block_id in self._cache:
                    self._cache.release(block_id)
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- internals -----------------------------------------------------------------------------------------------

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        """Block `index`'s prefix-cache content: its token ids, then the content hashes of the images it overlaps."""
        tokens = seq.token_ids[index * self.block_size : (index + 1) * self.block_size]
        if seq.mm_items and index * self.block_size < seq.num_prompt_tokens:
            tokens = tokens + block_extras(seq.mm_items, index, self.block_size)
        return tokens

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, extended to cover its first `num_blocks` (full) blocks. Valid forever since token ids
        only grow; the salt is fixed for a sequence's life."""
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else root_key(seq.cache_salt)
        for i in range(len(hashes), num_blocks):
            parent = hash_block(parent, self._block_tokens(seq, i))
            hashes.append(parent)
        return hashes

    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """Assert the block states are consistent (for tests and debugging; O(num_blocks)). With `seqs`, the holders
        of every block: their block tables must account for the ref counts exactly."""
        free, evictable = set(self._free), {b for b in range(self.num_blocks) if self._cache.is_evictable(b)}
        used = {b for b, n in enumerate(self._ref_counts) if n > 0}
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not (free & evictable) and not (free & used) and not (evictable & used)
        assert len(free) + len(evictable) + len(used) == self.num_blocks
        assert not any(b in self._cache for b in free), "a free block is still cached"
        for b in used:
            assert self._ref_counts[b] == 1 or b in self._cache, f"block {b} is shared but not a cached block"
        if seqs is not None:
            counts = [0] * self.num_blocks
            for seq in seqs:
                assert len(set(seq.block_table)) == len(seq.block_table), f"{seq.request_id} holds a block twice"
                for b in seq.block_table:
                    counts[b] += 1
            assert counts == self._ref_counts, "ref counts do not match the block tables"
