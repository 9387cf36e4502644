"""BlockManager: ref-counted blocks, prefix hits over full blocks, LRU eviction, free/used/evictable accounts."""

from __future__ import annotations

import pytest

from lm_core.generation_config import GenerationConfig
from lm_torch import block_manager as block_manager_module
from lm_torch.block_manager import BlockManager
from lm_torch.sequence import Sequence, SequenceStatus


def make_seq(tokens, request_id="r", num_prompt=None, salt=None) -> Sequence:
    tokens = list(tokens)
    return Sequence(request_id, tokens, num_prompt or len(tokens), GenerationConfig(), cache_salt=salt)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What one scheduler step does for a sequence: slots, compute (pretend), commit."""
    n = seq.num_tokens - seq.num_computed_tokens if num_tokens is None else num_tokens
    assert bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def admit(bm: BlockManager, seq: Sequence) -> None:
    bm.allocate_cached_prefix(seq)
    compute(bm, seq)


@pytest.mark.parametrize(("kwargs", "field"), [({"num_blocks": 0}, "num_blocks"), ({"block_size": True}, "block_size")])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"BlockManager\.{field}"):
        BlockManager(**{"num_blocks": 4, "block_size": 4, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"num_prompt_tokens": 0}, "num_prompt_tokens"),
        ({"num_prompt_tokens": 4}, "num_prompt_tokens"),
        ({"num_computed_tokens": 5}, "num_computed_tokens"),
        ({"num_cached_tokens": 4}, "num_cached_tokens"),
        ({"gen_config": {}}, "gen_config"),
        ({"finish_reason": "done"}, "finish_reason"),
        ({"cache_salt": 3}, "cache_salt"),
    ],
)
def test_sequence_validation_names_the_field(kwargs, field):
    args = {"request_id": "r", "token_ids": [1, 2, 3], "num_prompt_tokens": 3, "gen_config": GenerationConfig()}
    with pytest.raises(ValueError, match=rf"Sequence\.{field}"):
        Sequence(**{**args, **kwargs})
    with pytest.raises(ValueError, match=r"Sequence\.token_ids"):
        Sequence("r", [], 1, GenerationConfig())


def test_sequence_properties():
    prompt = [5, 6, 7]
    seq = Sequence("r", prompt, 3, GenerationConfig(stop_token_ids=[2]))
    seq.append_token(9)
    assert prompt == [5, 6, 7], "generation must not extend the caller's list"
    assert (seq.num_tokens, seq.num_generated, seq.last_token_id) == (4, 1, 9)
    assert seq.prompt_token_ids == [5, 6, 7] and seq.generated_token_ids == [9] and seq.stop_token_ids == {2}
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    seq.finish("length")
    assert seq.is_finished and seq.finish_reason == "length"


def test_allocate_append_free_without_caching():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    seq = make_seq(range(10))
    bm.allocate_cached_prefix(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.can_append(seq, 10) and not bm.can_append(seq, 17)
    compute(bm, seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    compute(bm, seq)  # the remaining 4 tokens need a third block
    assert len(seq.block_table) == 3 and bm.usage() == 0.75 and bm.num_cached_blocks == 0
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4 and bm.usage() == 0.0
    bm.check_invariants([])


def test_append_slots_fails_without_changes():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(12))
    bm.allocate_cached_prefix(seq)
    assert not bm.can_append(seq, 12)
    assert not bm.append_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    with pytest.raises(ValueError, match="cannot compute"):
        bm.append_slots(seq, 13)


def test_shared_prefix_reuses_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq([*range(10), 50], "a")
    admit(bm, first)
    assert bm.num_cached_blocks == 2  # tokens 0..7; the third block (8, 9, 50) is not full
    second = make_seq([*range(10), 60, 61], "b")
    bm.allocate_cached_prefix(second)
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert all(bm.ref_count(b) == 2 for b in second.block_table)
    compute(bm, second)
    assert second.block_table[2] != first.block_table[2]
    bm.check_invariants([first, second])
    assert bm.prefix_cache_hit_rate() == pytest.approx(8 / (11 + 12))


def test_block_holding_the_last_token_is_never_matched():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, make_seq(range(9), "a"))  # 2 full blocks cached
    same = make_seq(range(8), "b")  # its last token sits in the second block: only the first may match
    bm.allocate_cached_prefix(same)
    assert same.num_computed_tokens == 4 and len(same.block_table) == 1
    compute(bm, same)
    assert bm.ref_count(same.block_table[1]) == 1  # the recomputed block is its own, never the shared one


def test_released_blocks_stay_cached_then_are_evicted_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7], "a")
    admit(bm, seq)
    table = list(seq.block_table)
    bm.free(seq)
    # Three full blocks cached and evictable; free for allocation and usage, but still matchable.
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 4 and bm.usage() == 0.0
    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "b")
    assert bm.match_prefix(again) == table[:3]
    # A newcomer needing 3 blocks takes the free one first, then evicts the tail of the old prefix first.
    other = make_seq([9, 9, 9, 9, 9, 9], "c")
    bm.allocate_cached_prefix(other)
    compute(bm, other)
    assert bm.match_prefix(again) == [table[0]]
    bm.check_invariants([other])


def test_can_allocate_counts_revived_evictable_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5], "a")
    admit(bm, seq)
    bm.free(seq)
    again = make_seq([1, 2, 3, 4, 5, 6, 7], "b")
    cached = bm.match_prefix(again)
    assert len(cached) == 2 and bm.num_free_blocks == 3
    # 2 revived + 2 new blocks for 7 tokens > 3 free, but 2 revived + 1 new for 6 tokens fits.
    assert not bm.can_allocate(cached, 7) and bm.can_allocate(cached, 6)


def test_duplicate_blocks_stay_private_and_the_chain_goes_on():
    bm = BlockManager(num_blocks=16, block_size=2)
    a, b = make_seq([1, 2, 3, 4, 5], "a"), make_seq([1, 2, 3, 4, 5], "b")
    bm.allocate_cached_prefix(a)
    bm.allocate_cached_prefix(b)  # both admitted before either computed: no hits
    compute(bm, a)
    compute(bm, b)
    assert bm.num_cached_blocks == 2 and not any(bm.is_cached(x) for x in b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 2
    bm.check_invariants([])


def test_generated_tokens_are_cached_once_computed():
    bm = BlockManager(num_blocks=8, block_size=2)
    seq = make_seq([1, 2, 3], "a")
    admit(bm, seq)
    seq.append_token(4)  # sampled: its KV is not written yet, so its block is not committed
    assert bm.num_cached_blocks == 1
    compute(bm, seq)  # the decode step writes it
    assert bm.num_cached_blocks == 2


def test_salt_separates_prefixes():
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, make_seq([1, 2, 3, 4, 5], "a", salt="lora-x"))
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []
    assert len(bm.match_prefix(make_seq([1, 2, 3, 4, 5], "c", salt="lora-x"))) == 2


def test_disabled_caching_keeps_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    seq = make_seq([1, 2, 3, 4, 5], "a")
    admit(bm, seq)
    bm.free(seq)
    assert bm.num_cached_blocks == 0 and bm.match_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []
    assert bm.prefix_cache_hit_rate() == 0.0


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5], "a")
    admit(bm, seq)
    assert not bm.reset_prefix_cache()  # cached blocks in use
    bm.free(seq)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 4
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []
    bm.check_invariants([])


def test_colliding_hashes_never_give_wrong_blocks(monkeypatch):
    """Even if every key collided, lookups compare token ids and parent keys, so a hit is always the right prefix."""
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent, tokens: b"\x01" * 16)
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, make_seq([1, 2, 3, 4, 5], "a"))
    assert bm.match_prefix(make_seq([7, 8, 3, 4, 5], "b")) == []
    assert len(bm.match_prefix(make_seq([1, 2, 3, 4, 5], "c"))) == 1  # block 0 only: its key holds the only entry
    # Block 1 has block 0's tokens and (collided) key, but the entry's parent is the root: rejected.
    assert len(bm.match_prefix(make_seq([1, 2, 1, 2, 5], "d"))) == 1
