"""Timing and the record of one measurement."""

import dataclasses
import statistics
import time

import torch

SHORT_MS = 2.0


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
    at the resolution of the clock and the loop's own overhead."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
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
