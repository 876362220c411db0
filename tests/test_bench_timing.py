"""bench.timing on a fake clock. paired_step_ms: the step of (run(n) - run(1)) / (n - 1) over
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


def test_interleaved_sides_share_a_slow_spell(monkeypatch):
    """ABBA order: ours, peer, peer, ours, ... and a spell that slows the machine 3x for a while
    lands on both sides' samples, so the ratio of medians stays the true one (2x); timed one
    side after the other, the spell would fall on one side alone."""
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    order = []

    def side(name, cost_ms):
        def run():
            order.append(name)
            slow = 3.0 if 10 <= len(order) <= 13 else 1.0  # two samples of each side
            clock.now += cost_ms * slow / 1e3
        return run

    ms, peer_ms = timing.interleaved_ms(side("ours", 50.0), side("peer", 100.0), timing.torch.device("cpu"),
                                        warmup=1, repeats=8)
    assert order[:2] == ["ours", "peer"]  # the warm-up of each
    assert order[2:10] == ["ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours"]
    assert len(order) == 2 + 2 * 8
    assert peer_ms / ms == pytest.approx(2.0)
    assert (ms, peer_ms) == (pytest.approx(50.0), pytest.approx(100.0))
