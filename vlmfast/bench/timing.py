"""Timing and the record of one measurement."""

import dataclasses
import statistics
import time

import torch


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
    medians of `repeats` runs on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
