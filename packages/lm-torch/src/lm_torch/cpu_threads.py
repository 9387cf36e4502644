"""The CPU engine's torch thread count, chosen while it runs by timing steps.

Every torch op of a step splits its work over an OpenMP thread team and waits, at the op's end, for the team's
slowest member. On a quiet machine one thread per core is fastest. When other processes hold cores, a member that
waits for a core stalls every op of the step, and a step on all cores can take many times longer than on one thread.
No fixed count suits both, and the load changes while a server runs, so `ThreadTuner` compares: now and then it runs
a trial of a few steps alternating between the count in use and a neighbouring one (adjacent steps have nearly the
same shape, so their times compare), keeps the faster, and waits before the next trial. The wait doubles while trials
confirm the count in use (up to `max_interval_s`) and is never shorter than what keeps the steps lost to trials under
`explore_fraction` of the time, so a trial of a count that collapses under load stays rare.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def thread_candidates(max_threads: int) -> list[int]:
    """The counts the tuner moves between, ascending: 1, halvings of `max_threads`, `max_threads` - 1 and itself."""
    counts = {1, max_threads, max(max_threads - 1, 1)}
    half = max_threads // 2
    while half > 1:
        counts.add(half)
        half //= 2
    return sorted(counts)


def step_cost(num_tokens: int) -> float:
    """A step's relative cost, to compare the times of two steps of slightly different sizes: a fixed part (reading
    the weights, worth about 16 tokens' compute on a small model) plus one unit per token."""
    return num_tokens + 16.0


class ThreadTuner:
    """Picks the thread count of each CPU step (see the module docstring). `next_threads` before a step, `record`
    after it; not thread-safe (the engine's step thread alone calls it)."""

    def __init__(
        self,
        max_threads: int,
        *,
        trial_pairs: int = 2,
        min_gain: float = 0.1,
        explore_fraction: float = 0.05,
        min_interval_s: float = 2.0,
        max_interval_s: float = 60.0,
        warmup_steps: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.candidates = thread_candidates(max_threads)
        self.current = max_threads
        self.trial_pairs = trial_pairs
        self.min_gain = min_gain
        self.explore_fraction = explore_fraction
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.clock = clock
        self.interval_s = min_interval_s
        self._steps_until_first_trial = warmup_steps
        self._next_trial_at: float | None = None  # set once the warm-up steps are done
        self._go_down = True  # direction of the next trial's neighbour
        self._candidate: int | None = None  # the count on trial, None between trials
        self._trial: list[tuple[int, float, float]] = []  # (threads, seconds, step_cost) of the trial's steps
        self.switches = 0  # times the count in use changed (for benchmarks and tests)

    def next_threads(self) -> int:
        """The thread count for the next step."""
        if self._candidate is None and self._trial_due():
            self._candidate = self._neighbour()
            self._trial = []
        if self._candidate is None:
            return self.current
        # Within a trial: candidate, current, candidate, current, ...
        return self._candidate if len(self._trial) % 2 == 0 else self.current

    def record(self, threads: int, num_tokens: int, seconds: float) -> None:
        """The wall time of a step that ran `num_tokens` tokens on `threads` threads."""
        if self._candidate is None:
            if self._next_trial_at is None:
                self._steps_until_first_trial -= 1
                if self._steps_until_first_trial <= 0:
                    self._next_trial_at = self.clock()
            return
        self._trial.append((threads, seconds, step_cost(num_tokens)))
        if len(self._trial) % 2:
            return
        # Seconds per unit of cost of each count over the trial so far.
        candidate = self._rate(lambda n: n == self._candidate)
        current = self._rate(lambda n: n != self._candidate)
        # One pair decides when the gap is large: a collapsing count is not run again to confirm it.
        clear = candidate > 3 * current or current > 3 * candidate
        if clear or len(self._trial) >= 2 * self.trial_pairs:
            self._finish(self._candidate, candidate, current)

    def _rate(self, chosen: Callable[[int], bool]) -> float:
        seconds = sum(s for n, s, _ in self._trial if chosen(n))
        cost = sum(c for n, _, c in self._trial if chosen(n))
        return seconds / cost

    def _finish(self, trial: int, candidate: float, current: float) -> None:
        """Ends the trial of thread count `trial`, whose rate is `candidate` against the current count's `current`."""
        # The seconds the slower count's steps of this trial took beyond what the faster count would have.
        slower = trial if candidate > current else self.current
        lost = sum(c for n, _, c in self._trial if n == slower) * abs(candidate - current)
        if candidate < (1 - self.min_gain) * current:
            self.current = trial
            self.switches += 1
            self.interval_s = self.min_interval_s
            # Keep moving the same way while it pays; the way back is the next trial's otherwise.
        else:
            self._go_down = not self._go_down
            self.interval_s = min(2 * self.interval_s, self.max_interval_s)
        wait = max(self.interval_s, lost / self.explore_fraction)
        self._next_trial_at = self.clock() + wait
        self._candidate = None
        self._trial = []

    def _trial_due(self) -> bool:
        return self._next_trial_at is not None and self.clock() >= self._next_trial_at and len(self.candidates) > 1

    def _neighbour(self) -> int:
        index = self.candidates.index(self.current)
        if index == 0:
            self._go_down = False
        elif index == len(self.candidates) - 1:
            self._go_down = True
        return self.candidates[index - 1] if self._go_down else self.candidates[index + 1]
