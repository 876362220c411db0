"""bench.timing.paired_step_ms on a fake clock: the step of (run(n) - run(1)) / (n - 1) over
interleaved pairs, robust to a slow spell in one pair, and an error (not a clamped, absurd
speed-up) when the longer runs take no longer."""

import pytest

from vlmfast.bench import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def run_costing(clock, cost_ms):
    calls = []

    def run(n):
        calls.append(n)
        clock.now += cost_ms(n, len(calls)) / 1e3

    return run


def test_step_from_interleaved_pairs(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    # 100 ms of prompt, 2 ms a step; the 5th call (a 17-step run) hit a 500 ms stall
    run = run_costing(clock, lambda n, call: 100 + 2 * n + (500 if call == 5 else 0))
    full, step = timing.paired_step_ms(run, 17, repeats=5)
    assert step == pytest.approx(2.0)
    assert full == pytest.approx(134.0)


def test_noise_larger_than_the_steps_is_an_error(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    run = run_costing(clock, lambda n, call: 100 if n > 1 else 150)  # the longer run is never longer
    with pytest.raises(RuntimeError, match="too noisy a machine to time the steps"):
        timing.paired_step_ms(run, 17, repeats=3)
    with pytest.raises(ValueError, match="n: expected at least 2"):
        timing.paired_step_ms(run, 1, repeats=3)
