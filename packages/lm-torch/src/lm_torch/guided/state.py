"""`GrammarState`: one guided request's xgrammar matcher, kept in step with the request's generated tokens.

Invariant: after every engine step the matcher has accepted exactly the sequence's generated tokens. The runner
fills the next-token bitmask from it before sampling and feeds it the sampled token after. A preempted sequence keeps
its tokens (recompute preemption only drops KV), so it keeps its matcher state too; `sync` still checks the count
before each mask and rolls back or replays tokens if they ever differ, so the mask always describes the real prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch


class GrammarState:
    """A request's matcher plus what the scheduler reads: `is_terminated` (a stop token completed the grammar)
    and `error` (the grammar rejected a token; the request must end)."""

    def __init__(self, compiled_grammar: Any, stop_token_ids: list[int] | None = None) -> None:
        import xgrammar as xgr

        # The stop tokens are the only tokens the mask allows once the grammar is complete, and only then.
        self.matcher = xgr.GrammarMatcher(compiled_grammar, override_stop_tokens=stop_token_ids)
        self.num_accepted = 0
        self.is_terminated = False
        self.error: str | None = None

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and `error` set) if the grammar does not allow it."""
        if self.error is not None:
            return False
        if not self.matcher.accept_token(token_id):
            # Only possible when every token the grammar allows was masked by something else (bad_token_ids, ...):
            # the sampler then had no allowed token left to pick.
            self.error = (
                f"response_format: token {token_id} does not fit the grammar after {self.num_accepted} generated "
                "tokens (nothing the grammar allows was left to sample)"
            )
            return False
        self.num_accepted += 1
        self.is_terminated = self.matcher.is_terminated()
        return True

    def sync(self, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """Make the matcher's state that after the generated tokens `token_ids[num_prompt_tokens:]`."""
        num_generated = len(token_ids) - num_prompt_tokens
        if self.num_accepted == num_generated:
            return
        if self.num_accepted > num_generated:
            self.matcher.rollback(self.num_accepted - num_generated)
            self.num_accepted = num_generated
            self.is_terminated = self.matcher.is_terminated()
            return
        for token_id in token_ids[num_prompt_tokens + self.num_accepted :]:
            if not self.accept(token_id):
                return

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` ([rows, ceil(vocab / 32)] int32 on the CPU)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)


def fill_bitmasks(
    states: list[GrammarState], seqs: Sequence[Any], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """One step's masks: row j allows the next tokens of `states[j]`, first synced with `seqs[j]`'s tokens.

    Returns [len(states), ceil(vocab_size / 32)] int32 on `device`; bit `t % 32` of word `t // 32` is 1 iff token t
    is allowed (xgrammar's layout). Several rows are filled on xgrammar's own threads.
    """
    import xgrammar as xgr

    for state, seq in zip(states, seqs, strict=True):
        state.sync(seq.token_ids, seq.num_prompt_tokens)
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)  # all allowed; every row is overwritten
    if len(states) == 1:
        states[0].fill(bitmask, 0)
    else:
        _batch_matcher().batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
    return bitmask.to(device, non_blocking=True)


@functools.cache
def _batch_matcher() -> Any:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher()
