"""Image spans in the scheduler and the prefix cache: chunks and prefix hits never end inside a span, a block over an
image is keyed by the image too, and the per-step encoder budget spreads images over steps.

The scheduler runs here without a model: each step's batch is checked, then every sampled token is a fixed id.
"""

from __future__ import annotations

import itertools

from lm_core.generation_config import GenerationConfig
from lm_torch.block_manager import BlockManager
from lm_torch.multimodal import MMItem, clamp_chunk, clamp_prefix
from lm_torch.scheduler import Scheduler, StepResult
from lm_torch.sequence import Sequence

_ids = itertools.count()


def seq_with_images(spans: list[tuple[int, int]], prompt_len: int, hashes: list[str] | None = None) -> Sequence:
    hashes = hashes or [f"{k:064x}" for k in range(len(spans))]
    items = tuple(MMItem("image", o, n, h, None) for (o, n), h in zip(spans, hashes, strict=True))
    tokens = [3 + (i % 7) for i in range(prompt_len)]
    for o, n in spans:
        tokens[o : o + n] = [1] * n  # the placeholder id
    cfg = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    return Sequence(f"r{next(_ids)}", tokens, prompt_len, cfg, mm_items=items)


def run_steps(scheduler: Scheduler, steps: int = 50) -> list[list[tuple[Sequence, int, int]]]:
    """(seq, start, num_new) of every row of every step, until nothing is left."""
    history = []
    for _ in range(steps):
        batch = scheduler.schedule()
        if not batch.seqs:
            break
        history.append(list(zip(batch.seqs, batch.starts, batch.num_new_tokens, strict=True)))
        scheduler.update(batch, StepResult([[5] if k else [] for k in batch.num_sampled], [None] * len(batch.seqs)))
    return history


def assert_no_split(history) -> None:
    for step in history:
        for seq, start, num_new in step:
            for item in seq.mm_items:
                end = start + num_new
                assert not (item.offset < end < item.end), (start, num_new, item)
                assert not (item.offset < start < item.end), (start, num_new, item)


def test_a_chunk_ends_before_a_span_or_takes_it_whole():
    items = (MMItem("image", 10, 20, "a" * 64, None), MMItem("image", 40, 5, "b" * 64, None))
    assert clamp_chunk(items, 0, 16) == 10  # would end inside the first span: stops before it
    assert clamp_chunk(items, 10, 8) == 20  # starts the span: takes all of it, past the budget
    assert clamp_chunk(items, 30, 12) == 10  # stops before the second span
    assert clamp_chunk(items, 0, 9) == 9 and clamp_chunk(items, 30, 20) == 20


def test_chunked_prefill_with_a_small_budget_never_splits_a_span():
    bm = BlockManager(64, 16)
    scheduler = Scheduler(bm, max_batch_size=4, max_num_batched_tokens=8)
    seqs = [seq_with_images([(5, 20), (30, 3)], 60), seq_with_images([(0, 12)], 20)]
    for seq in seqs:
        scheduler.add(seq)
    history = run_steps(scheduler)
    assert_no_split(history)
    assert all(seq.is_finished and seq.num_generated == 2 for seq in seqs)


def test_a_prefix_hit_stops_at_the_start_of_a_span_it_would_end_inside():
    items = (MMItem("image", 20, 30, "c" * 64, None),)
    assert clamp_prefix(items, 2, 16) == 1  # 32 cached tokens end inside [20, 50): keep the block before it
    assert clamp_prefix(items, 4, 16) == 4  # 64 cached tokens cover the whole span
    assert clamp_prefix(items, 1, 16) == 1


def test_the_same_placeholders_over_another_image_miss_the_prefix_cache():
    bm = BlockManager(64, 16)
    scheduler = Scheduler(bm, max_batch_size=4, max_num_batched_tokens=256)
    first = seq_with_images([(20, 16)], 70, ["d" * 64])
    scheduler.add(first)
    run_steps(scheduler)
    same = seq_with_images([(20, 16)], 70, ["d" * 64])
    other = seq_with_images([(20, 16)], 70, ["e" * 64])
    assert same.token_ids == other.token_ids == first.prompt_token_ids
    assert len(bm.match_prefix(same)) == 4  # every full block but the last token's
    assert len(bm.match_prefix(other)) == 1  # only the block before the image


def test_the_encoder_budget_spreads_images_over_steps():
    bm = BlockManager(64, 16)
    scheduler = Scheduler(bm, max_batch_size=4, max_num_batched_tokens=512, max_encoder_tokens=30)
    seqs = [seq_with_images([(4, 20)], 40), seq_with_images([(2, 20)], 40), seq_with_images([(1, 40)], 60)]
    for seq in seqs:
        scheduler.add(seq)
    history = run_steps(scheduler)
    assert_no_split(history)
    for step in history:
        encoded = [
            item.length
            for seq, start, num_new in step
            for item in seq.mm_items
            if item.offset >= start and item.end <= start + num_new
        ]
        # At most the budget, except one image larger than the whole budget, alone in its step.
        assert sum(encoded) <= 30 or encoded == [40], encoded
    assert len(history[0]) >= 2  # the second prompt's text before its image still goes in the first step
    assert all(seq.is_finished for seq in seqs)
