"""Choosing one of several targets for a request: the least-load rule, and a router that adds prefix affinity.

`least_loaded` is the rule both the data-parallel engine (replicas in one process) and the proxy (servers behind one
address) pick by: the smallest load, ties broken in round-robin order so equal targets take turns. `Router` tracks
its own requests in flight per target and prefers the target that recently served the same prompt prefix, whose
prefix cache likely still holds that prefix's KV, unless that target is busier than the least-loaded one by more
than a margin. Plain Python, no torch; every method runs on one event loop, so counting a request happens in the same
call that picks its target, with no `await` between.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


def in_turn(indices: Iterable[int], start: int) -> list[int]:
    """`indices` in round-robin order from `start`: those at or after it ascending, then those before it."""
    return sorted(indices, key=lambda i: (i < start, i))


def least_loaded(loads: Mapping[int, float], start: int = 0) -> int | None:
    """The target (a key of `loads`, target -> load) with the smallest load; None when `loads` is empty.

    Among equal loads the first in turn from `start` wins (`in_turn`): a caller that moves `start` past each pick
    makes equally loaded targets take turns.
    """
    order = in_turn(loads, start)
    return min(order, key=loads.__getitem__) if order else None  # min keeps the first of equals


@dataclass(frozen=True)
class RouterConfig:
    """How `Router` weighs prefix affinity against load.

    A prompt's prefix is matched in whole blocks of `block_size` tokens (prefix caches share KV in whole blocks, so a
    shorter match reuses nothing), over at most its first `max_prefix_tokens` tokens. The affinity target is the one
    that served the longest remembered prefix; it is kept when that prefix covers at least `min_match_ratio` of the
    prompt's matchable blocks and its load exceeds the least-loaded target's by at most
    `max(balance_abs_margin, balance_rel_margin * least load)`. `max_prefixes`: how many prefix hashes are remembered
    (one per block of each routed prompt; the least recently used is forgotten first).
    """

    block_size: int = 16
    max_prefix_tokens: int = 512
    min_match_ratio: float = 0.5
    balance_abs_margin: int = 2
    balance_rel_margin: float = 0.25
    max_prefixes: int = 32768

    def __post_init__(self) -> None:
        """Check every field (ValueError naming it)."""
        for name in ("block_size", "max_prefix_tokens", "max_prefixes"):
            _check_int(name, getattr(self, name), 1)
        _check_int("balance_abs_margin", self.balance_abs_margin, 0)
        if self.max_prefix_tokens < self.block_size:
            raise ValueError(
                f"RouterConfig.max_prefix_tokens must be at least block_size ({self.block_size}), got "
                f"{self.max_prefix_tokens}"
            )
        for name in ("min_match_ratio", "balance_rel_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"RouterConfig.{name} must be a non-negative number, got {value!r}")
        if self.min_match_ratio > 1:
            raise ValueError(f"RouterConfig.min_match_ratio must be at most 1, got {self.min_match_ratio!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int_at_least(value, minimum):
        raise ValueError(f"RouterConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _is_int_at_least(value: object, minimum: int) -> bool:
    """Whether `value` is an int (not a bool) of at least `minimum` (callers need not be type-checked)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class Router:
    """Picks one of `num_targets` targets per request: least in flight, with prefix affinity (see `RouterConfig`).

    `route` counts the request on its target and `release` uncounts it; every `route` must be paired with exactly one
    `release`. The load is the router's own count of requests in flight, so it is exact whatever the targets report.
    """

    def __init__(self, num_targets: int, config: RouterConfig | None = None) -> None:
        if not _is_int_at_least(num_targets, 1):
            raise ValueError(f"num_targets must be a positive integer, got {num_targets!r}")
        self.config = config if config is not None else RouterConfig()
        self.num_targets = num_targets
        self._in_flight = [0] * num_targets
        self._num_routed = [0] * num_targets
        # Chained hash of a prompt's first k blocks -> the target that most recently served a prompt starting so;
        # oldest first.
        self._prefixes: OrderedDict[int, int] = OrderedDict()
        # Where the search for the least-loaded target starts: just after the last target picked.
        self._cursor = 0

    @property
    def in_flight(self) -> list[int]:
        """Requests routed to each target and not released yet."""
        return list(self._in_flight)

    @property
    def num_routed(self) -> list[int]:
        """Requests routed to each target since the router was made."""
        return list(self._num_routed)

    @property
    def num_prefixes(self) -> int:
        """Prefix hashes remembered now (at most `config.max_prefixes`)."""
        return len(self._prefixes)

    def route(self, prompt_token_ids: Sequence[int] | None = None, exclude: Collection[int] = ()) -> int:
        """The target for a request with this prompt (None: by load alone), counted in flight there until `release`.

        Targets in `exclude` (ones that cannot serve now) are never picked; it must leave at least one.
        """
        loads = {i: load for i, load in enumerate(self._in_flight) if i not in exclude}
        least = least_loaded(loads, self._cursor)
        if least is None:
            raise ValueError(f"exclude names every target ({self.num_targets}): there is none to route to")
        keys = self.prefix_keys(prompt_token_ids) if prompt_token_ids is not None else []
        target = least
        affine = self._affinity(keys)
        if affine is not None and affine in loads and not self._is_overloaded(affine, loads[least]):
            target = affine
        for key in keys:
            self._prefixes[key] = target
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > self.config.max_prefixes:
            self._prefixes.popitem(last=False)
        self._cursor = target + 1
        self._in_flight[target] += 1
        self._num_routed[target] += 1
        return target

    def release(self, target: int) -> None:
        """A request `route` sent to `target` has ended (finished, failed or abandoned)."""
        if not 0 <= target < self.num_targets or self._in_flight[target] == 0:
            raise ValueError(f"target {target} has no request in flight to release")
        self._in_flight[target] -= 1

    def prefix_keys(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """Hashes of the prompt's first 1, 2, ... whole blocks, up to `max_prefix_tokens` tokens (shortest first).

        Each hash chains the previous one with the next block's tokens, so equal keys mean equal prefixes (up to hash
        collisions, which only cost a less apt placement). A prompt shorter than one block has none.
        """
        size = self.config.block_size
        num_blocks = min(len(prompt_token_ids), self.config.max_prefix_tokens) // size
        keys: list[int] = []
        previous = 0
        for i in range(num_blocks):
            previous = hash((previous, tuple(prompt_token_ids[i * size : (i + 1) * size])))
            keys.append(previous)
        return keys

    def _affinity(self, keys: list[int]) -> int | None:
        """The target that served the longest remembered prefix among `keys`, when that prefix is long enough."""
        for depth in range(len(keys), 0, -1):
            target = self._prefixes.get(keys[depth - 1])
            if target is not None:
                return target if depth >= self.config.min_match_ratio * len(keys) else None
        return None

    def _is_overloaded(self, target: int, least_load: int) -> bool:
        """Whether `target` is busier than the least-loaded target by more than the configured margin."""
        cfg = self.config
        margin = max(cfg.balance_abs_margin, cfg.balance_rel_margin * least_load)
        return self._in_flight[target] - least_load > margin
