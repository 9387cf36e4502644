"""The routing core shared by the data-parallel engine and the proxy: the least-load rule, and the router's choices
(least in flight, prefix affinity kept within the balance margin and broken beyond it, the bounded memory of
prefixes). Every expected target is worked out in the test from the rules as documented."""

from __future__ import annotations

import random

import pytest

from lm_core.routing import Router, RouterConfig, in_turn, least_loaded

# Small blocks, so that a prompt of a few tokens has several of them.
BLOCK = 4


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_in_turn_starts_at_start_and_wraps():
    assert in_turn([0, 1, 2, 3], 2) == [2, 3, 0, 1]
    assert in_turn({3: "d", 0: "a", 2: "c"}, 1) == [2, 3, 0]
    assert in_turn([0, 1], 5) == [0, 1]  # past the end: from the beginning


def test_least_loaded_takes_the_smallest_load_and_breaks_ties_in_turn():
    assert least_loaded({0: 3, 1: 1, 2: 2}) == 1
    assert least_loaded({0: 1, 1: 1, 2: 1}, start=0) == 0
    assert least_loaded({0: 1, 1: 1, 2: 1}, start=2) == 2
    assert least_loaded({0: 1, 1: 1, 2: 5}, start=2) == 0  # 2 is busier: the turn wraps to 0
    assert least_loaded({4: 0.5, 7: 0.25}) == 7  # keys are any target indices, loads any numbers
    assert least_loaded({}) is None


def test_requests_without_affinity_go_to_the_least_loaded_in_turn():
    router = Router(3)
    # Nothing released: equal loads, so the targets take turns.
    assert [router.route() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert router.in_flight == [2, 2, 2]
    router.release(1)
    router.release(1)
    router.release(2)
    # In flight [2, 0, 1]: 1. Then 1 and 2 tie at one, and the turn after 1 starts at 2. Then 1 (one) before 0 (two).
    assert router.route() == 1
    assert router.in_flight == [2, 1, 1]
    assert router.route() == 2
    assert router.route() == 1
    assert router.num_routed == [2, 4, 3]


def test_a_prompt_shorter_than_a_block_has_no_affinity():
    router = Router(2, RouterConfig(block_size=BLOCK, max_prefix_tokens=16))
    short = tokens(0, BLOCK - 1)
    assert router.prefix_keys(short) == []
    picks = []
    for _ in range(4):
        picks.append(router.route(short))
        router.release(picks[-1])
    assert picks == [0, 1, 0, 1]  # by load and turn alone
    assert router.num_prefixes == 0


def test_prefix_keys_cover_whole_blocks_up_to_the_limit_and_chain():
    router = Router(1, RouterConfig(block_size=BLOCK, max_prefix_tokens=3 * BLOCK))
    prompt = tokens(1, 5 * BLOCK + 2)
    keys = router.prefix_keys(prompt)
    assert len(keys) == 3
    assert len(router.prefix_keys(prompt[: 2 * BLOCK + 3])) == 2
    # Equal prefixes give equal keys, whatever follows them; a change in the first block changes every key.
    assert router.prefix_keys(prompt[: 2 * BLOCK] + tokens(2, BLOCK))[:2] == keys[:2]
    changed = [prompt[0] + 1, *prompt[1:]]
    assert not set(router.prefix_keys(changed)) & set(keys)


def test_affinity_is_kept_within_the_margin_then_broken_and_moved():
    config = RouterConfig(block_size=BLOCK, max_prefix_tokens=4 * BLOCK, balance_abs_margin=2, balance_rel_margin=0)
    router = Router(3, config)
    shared = tokens(3, 4 * BLOCK)
    picks = [router.route(shared + tokens(10 + i, 3)) for i in range(6)]
    # 1st: all idle, target 0. 2nd and 3rd: 0 has 1 then 2 in flight, the least loaded 0: excess <= 2, kept.
    # 4th: 0 has 3, excess 3 > 2: the least loaded, in turn after 0, is 1, and the prefix now maps to 1.
    # 5th and 6th: 1 has 1 then 2 in flight, the least loaded (2) has 0: excess 1 then 2, kept on 1.
    assert picks == [0, 0, 0, 1, 1, 1]
    assert router.in_flight == [3, 3, 0]
    # An unrelated prompt goes by load: target 2.
    assert router.route(tokens(4, 4 * BLOCK)) == 2


def test_relative_margin_grows_with_the_least_load():
    config = RouterConfig(block_size=BLOCK, max_prefix_tokens=2 * BLOCK, balance_abs_margin=0, balance_rel_margin=0.5)
    router = Router(2, config)
    prompt = tokens(5, 2 * BLOCK)
    assert router.route(prompt) == 0
    for _ in range(9):  # by load: 1, 0, 1, ... until both hold 5
        router.route()
    assert router.in_flight == [5, 5]
    router.release(1)
    # Least load 4, margin 0.5 * 4 = 2: the prompt's target 0 is kept at 5 and 6 in flight (excess 1, 2), not at 7.
    assert [router.route(prompt) for _ in range(3)] == [0, 0, 1]


def test_a_short_shared_prefix_is_not_worth_an_affinity():
    config = RouterConfig(block_size=BLOCK, max_prefix_tokens=4 * BLOCK, min_match_ratio=0.5)
    router = Router(2, config)

    def route_released(prompt: list[int] | None) -> int:
        target = router.route(prompt)
        router.release(target)
        return target

    first = tokens(6, 4 * BLOCK)
    assert route_released(first) == 0
    # One block of four in common (0.25 < 0.5): by turn, target 1.
    assert route_released(first[:BLOCK] + tokens(7, 3 * BLOCK)) == 1
    assert route_released(None) == 0  # moves the turn on to 1
    # Two blocks of four (0.5): to 0, which served `first`, although it is 1's turn.
    assert route_released(first[: 2 * BLOCK] + tokens(8, 2 * BLOCK)) == 0
    # The whole of `first`, then more: all four matchable blocks are remembered on 0; the turn is 1's.
    assert route_released(first + tokens(9, 8)) == 0


def test_the_memory_of_prefixes_is_a_bounded_lru():
    # Two keys a prompt; room for four prompts.
    config = RouterConfig(block_size=BLOCK, max_prefix_tokens=2 * BLOCK, max_prefixes=8)
    prompts = [tokens(20 + i, 2 * BLOCK) for i in range(6)]

    def route_released(router: Router, prompt: list[int]) -> int:
        target = router.route(prompt)
        router.release(target)
        return target

    router = Router(2, config)
    # All idle, each prompt new: targets by turn, 0 1 0 1 0.
    assert [route_released(router, p) for p in prompts[:5]] == [0, 1, 0, 1, 0]
    assert router.num_prefixes == 8
    # prompts[0], the least recently used, is forgotten: it goes by turn (1), not to 0. That evicts prompts[1].
    assert route_released(router, prompts[0]) == 1
    # prompts[3] is remembered on 1, against the turn (0).
    assert route_released(router, prompts[3]) == 1
    # prompts[1] is forgotten: by turn, 0, not 1 where it went before.
    assert route_released(router, prompts[1]) == 0

    # Using a prefix refreshes it: prompts[0], used again before a fifth prompt comes, stays remembered.
    router = Router(2, config)
    assert [route_released(router, p) for p in prompts[:4]] == [0, 1, 0, 1]
    assert route_released(router, prompts[0]) == 0  # remembered; the turn was 0's too
    assert route_released(router, prompts[4]) == 1  # new: by turn; evicts prompts[1], now the least recently used
    assert router.num_prefixes == 8
    assert route_released(router, None) == 0  # moves the turn on to 1
    assert route_released(router, prompts[0]) == 0  # remembered on 0, against the turn


def test_excluded_targets_are_never_picked():
    router = Router(3, RouterConfig(block_size=BLOCK, max_prefix_tokens=2 * BLOCK))
    prompt = tokens(30, 2 * BLOCK)
    assert router.route(prompt) == 0
    router.release(0)
    # 0 served the prompt but is excluded: the least loaded of 1 and 2, in turn from 1.
    assert router.route(prompt, exclude={0}) == 1
    # In flight [0, 1, 0], the turn at 2: 2 (1 excluded, and busier anyway).
    assert router.route(None, exclude={1}) == 2
    with pytest.raises(ValueError, match="exclude names every target"):
        router.route(prompt, exclude={0, 1, 2})
    assert router.in_flight == [0, 1, 1]


def test_release_checks_its_target():
    router = Router(2)
    with pytest.raises(ValueError, match="target 0 has no request in flight"):
        router.release(0)
    router.route()
    with pytest.raises(ValueError, match="target 2"):
        router.release(2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"max_prefix_tokens": 8, "block_size": 16}, "max_prefix_tokens"),
        ({"min_match_ratio": 1.5}, "min_match_ratio"),
        ({"balance_abs_margin": -1}, "balance_abs_margin"),
        ({"balance_rel_margin": float("nan")}, "balance_rel_margin"),
        ({"max_prefixes": True}, "max_prefixes"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^RouterConfig\.{field}"):
        RouterConfig(**kwargs)


@pytest.mark.parametrize("num_targets", [0, -1, 1.0, True])
def test_a_router_needs_at_least_one_target(num_targets):
    with pytest.raises(ValueError, match="num_targets"):
        Router(num_targets)
