"""Timing and the record of one measurement."""

import dataclasses
import statistics
import time

import torch

SHORT_MS = 2.0
WARM_MS = 50.0  # every case runs at least this long (and `warmup` calls) before it is timed


@dataclasses.dataclass
class Result:
    """One case: vlmfast against a peer, measured in the same run."""

    suite: str
    case: str
    impl: str
    ms: float
    peer: str | None = None
    peer_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.peer_ms / self.ms if self.peer_ms else None


def time_ms(fn, device: torch.device, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median milliseconds of fn(): CUDA events via triton.testing.do_bench on a GPU, wall-clock
    medians of `repeats` samples on the CPU. A call under SHORT_MS is timed in a loop of enough
    calls to fill SHORT_MS per sample (the sample divided by the count): one call of ~10 us is
    at the resolution of the clock and the loop's own overhead. Before timing, the case runs for
    WARM_MS (at least `warmup` calls): one-time set-up (a thread pool starting, first-touch page
    faults of fresh buffers, a lazy import or compile) must not land in the first timed row."""
    if device.type == "cuda":
        import triton.testing

        fn()  # Triton compiles (and VLMFAST_TUNE tunes) on the first call: not in do_bench's estimate
        torch.cuda.synchronize(device)
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    start, calls = time.perf_counter(), 0
    while calls < warmup or (time.perf_counter() - start) * 1e3 < WARM_MS:
        fn()
        calls += 1
    start = time.perf_counter()
    fn()
    once = (time.perf_counter() - start) * 1e3
    calls = 1 if once >= SHORT_MS else min(1000, int(SHORT_MS / max(once, 1e-4)) + 1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(samples)


def interleaved_ms(fn, peer_fn, device: torch.device, *, warmup: int = 1, repeats: int = 5) -> tuple[float, float]:
    """(median ms of fn(), median ms of peer_fn()), the two sampled in turn on the CPU (ABBA
    rounds: fn, peer, peer, fn, ...): a shared CPU's slow spells (another tenant on the second
    core for a minute) then fall on both sides alike. Timed one after the other, the same code
    read 0.84x and 1.76x against transformers in two runs an hour apart on one 2-core machine.
    On a GPU each side through time_ms (do_bench's events; no such spells)."""
    if device.type == "cuda":
        return time_ms(fn, device, warmup=warmup, repeats=repeats), time_ms(peer_fn, device, warmup=warmup,
                                                                           repeats=repeats)
    for _ in range(max(1, warmup)):  # one-time set-up of each side outside the samples
        fn()
        peer_fn()
    sides, samples = (fn, peer_fn), ([], [])
    for i in range(repeats):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            sides[which]()
            samples[which].append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples[0]), statistics.median(samples[1])


def paired_step_ms(run, n: int, repeats: int) -> tuple[float, float]:
    """(median ms of run(n), median ms of one of the n - 1 steps run(n) makes beyond run(1)): the
    step from `repeats` interleaved pairs, (run(n) - run(1)) / (n - 1) each, so that the prompt,
    the first token and start-up cancel and a slow spell of the machine lands in both members of
    a pair rather than in one of two separate medians (which once gave a negative difference,
    clamped and printed as a 7e8x speed-up). RuntimeError when the median step is still not
    positive after a retry with twice the pairs: the machine's noise exceeds the steps measured."""
    if n < 2:
        raise ValueError(f"n: expected at least 2 (the steps beyond the first), got {n}")
    run(1)
    run(n)  # warm-up of both lengths
    for attempt in (repeats, 2 * repeats):
        fulls, steps = [], []
        for _ in range(attempt):
            start = time.perf_counter()
            run(1)
            one = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            run(n)
            full = (time.perf_counter() - start) * 1e3
            fulls.append(full)
            steps.append((full - one) / (n - 1))
        step = statistics.median(steps)
        if step > 0:
            return statistics.median(fulls), step
    raise RuntimeError(f"the {n}-step runs took no longer than the 1-step runs (median difference "
                       f"{step * (n - 1):.1f} ms over {attempt} pairs): too noisy a machine to time the steps")
