"""The CPU thread tuner against simulated machines: a clock that advances by each step's simulated time."""

from __future__ import annotations

import pytest

from lm_torch.cpu_threads import ThreadTuner, thread_candidates


def test_thread_candidates():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(4) == [1, 2, 3, 4]
    assert thread_candidates(16) == [1, 2, 4, 8, 15, 16]
    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(0)


class Machine:
    """Decode steps of `num_tokens` tokens whose seconds depend on the thread count through `seconds(threads)`,
    which the test may change midway (another process starting or stopping)."""

    def __init__(self, max_threads: int, seconds) -> None:
        self.now = 0.0
        self.seconds = seconds
        self.tuner = ThreadTuner(max_threads, clock=lambda: self.now)
        self.used: list[int] = []

    def run(self, num_steps: int, num_tokens: int = 1) -> float:
        """Run steps; returns the simulated seconds they took."""
        start = self.now
        for _ in range(num_steps):
            threads = self.tuner.next_threads()
            took = self.seconds(threads) * (num_tokens + 16) / 17
            self.now += took
            self.tuner.record(threads, num_tokens, took)
            self.used.append(threads)
        return self.now - start


QUIET = {1: 0.030, 2: 0.020}.__getitem__  # two cores free: two threads are 1.5x faster
BUSY = {1: 0.030, 2: 0.300}.__getitem__  # another process holds a core: a two-thread team collapses


def test_quiet_machine_keeps_every_core():
    machine = Machine(2, QUIET)
    seconds = machine.run(2000)
    assert machine.tuner.current == 2 and machine.tuner.switches == 0
    # Trials of one thread cost little: within 3% of two threads on every step.
    assert seconds <= 1.03 * 2000 * QUIET(2)
    assert machine.used.count(1) > 0  # it did compare


def test_busy_machine_drops_to_one_thread_and_returns_when_quiet():
    machine = Machine(2, BUSY)
    machine.run(10)
    assert machine.tuner.current == 1  # decided on the first trial, right after the warm-up steps
    seconds = machine.run(5000)
    # Against one thread throughout: the rare re-checks of two threads cost under 10%. A fixed two-thread team
    # would take 10x as long.
    assert seconds <= 1.10 * 5000 * BUSY(1)
    # The other process stops: two threads again once the next trial comes (at most max_interval_s later).
    machine.seconds = QUIET
    machine.run(int(2 * machine.tuner.max_interval_s / QUIET(2)))
    assert machine.tuner.current == 2
    assert machine.used[-100:].count(2) >= 90


def test_noise_within_min_gain_does_not_switch():
    machine = Machine(2, {1: 0.0205, 2: 0.020}.__getitem__)
    machine.run(3000)
    assert machine.tuner.current == 2 and machine.tuner.switches == 0


def test_many_cores_step_down_to_what_is_free():
    # 16 threads on a 16-core machine where two cores are busy: 15 collapses too, 8 is the fastest.
    times = {1: 0.2, 2: 0.1, 4: 0.05, 8: 0.03, 15: 0.4, 16: 0.5}
    machine = Machine(16, times.__getitem__)
    machine.run(3000)
    assert machine.tuner.current == 8
    assert machine.used[-200:].count(8) >= 180


def test_mixed_step_sizes_compare_per_token():
    # Prefill-sized steps on the trial: the cost model scales both counts' times alike, so the choice holds.
    machine = Machine(2, BUSY)
    machine.run(200, num_tokens=512)
    assert machine.tuner.current == 1
