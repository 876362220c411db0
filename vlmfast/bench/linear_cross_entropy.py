"""Fused linear + cross-entropy (the lm head's training loss) against torch's materialised
logits + F.cross_entropy, forward + backward: tokens/s and peak memory.

Peer: `F.cross_entropy((hidden @ weight.T).float(), labels)` then backward, what transformers'
loss does (the logits upcast to float32). Peak memory beyond the inputs: on a GPU
torch.cuda.max_memory_allocated; on the CPU the process's resident set, sampled every
millisecond by a thread while the step runs (the C++ kernel's buffers are not torch tensors, so
torch's allocator statistics would miss them). Shapes: SmolVLM2-256M's head (D = 576,
V = 49280) over 4096 tokens on the CPU; 16384 tokens and SmolVLM2-2.2B's head (D = 2048) on a GPU.
"""

import threading
import time

import torch
import torch.nn.functional as F

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms

MIB = 2**20
CPU_CASES = [(4096, 576, 49280)]
# N from 1024 up: the fused op must beat torch at every N >= 1024 (the Triton LSE sweep splits the
# vocabulary over programs so that small N still fills the GPU).
GPU_CASES = [(1024, 2048, 49280), (2048, 2048, 49280), (8192, 2048, 49280), (16384, 576, 49280)]
QUICK_CASES = [(256, 64, 1000)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_extra_mib(fn, device: torch.device) -> float:
    """Peak memory of fn() beyond what was in use when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, _rss_bytes()) - base) / MIB


def _inputs(n, d, v, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::7] = -100  # prompt / padding tokens
    return hidden, weight, labels


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    # A CPU step at the full size takes seconds: fewer repeats there.
    repeats = dict(warmup=1, repeats=3) if device.type == "cpu" and not quick else {}
    results = []
    for n, d, v in cases:
        hidden, weight, labels = _inputs(n, d, v, device, dtype)
        case = f"N={n} D={d} V={v} {str(dtype).removeprefix('torch.')} fwd+bwd"

        def fused():
            hidden.grad = weight.grad = None
            ops.linear_cross_entropy(hidden, weight, labels).backward()

        def materialised():
            hidden.grad = weight.grad = None
            F.cross_entropy((hidden @ weight.T).float(), labels).backward()

        fused()  # warm up (and grads allocated once) before the memory measurements
        fused_mib = peak_extra_mib(fused, device)
        materialised()
        peer_mib = peak_extra_mib(materialised, device)
        ms = time_ms(fused, device, **repeats)
        peer_ms = time_ms(materialised, device, **repeats)
        flops = 6 * n * d * v  # the logits GEMM and its two gradient GEMMs
        results.append(Result(
            "linear_cross_entropy", case, "vlmfast", ms, "torch materialised", peer_ms,
            tflops=flops / ms / 1e9, peak_mib=fused_mib,
            extra={"tokens_per_s": n / ms * 1e3, "peer_tokens_per_s": n / peer_ms * 1e3,
                   "peer_peak_mib": peer_mib, "memory_ratio": fused_mib / peer_mib if peer_mib > 0 else None},
        ))
    return results
