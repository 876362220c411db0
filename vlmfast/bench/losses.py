"""Contrastive losses (InfoNCE, SigLIP), forward + backward: vlmfast's fused kernels against the
materialised computation (open_clip style: the B x B logits in memory) in the same run, with the
extra memory each needs (TARGETS.md: CPU B = 8192, D = 512 fp32 >= 2x faster with O(B D) memory;
H200 B = 65536 <= 40 ms with <= 1 GiB extra, and B = 1,048,576 runs).

One Result per (loss, B): vlmfast's ms (median forward + backward to both features and the scale)
against peer = "materialised" (left out beyond GPU_PEER_LIMIT, where it would not fit), TFLOP/s of
the three B x B x D products, peak_mib = vlmfast's measured extra memory and extra["peer_peak_mib"]
the materialised one's, plus the memory each algorithm must hold (model_*_mib). Extra memory:
torch.cuda.max_memory_allocated beyond the inputs on a GPU; on the CPU the growth of the peak RSS
(VmHWM) of a fresh subprocess over one step, since tracemalloc does not see torch's allocations.
"""

import subprocess
import sys
import time

import torch

from vlmfast import ops
from vlmfast.bench import rss
from vlmfast.bench.timing import Result, time_ms
from vlmfast.ops import reference

D = 512
CPU_SIZES = [1024, 2048, 4096, 8192]
GPU_SIZES = [4096, 16384, 32768, 65536]
GPU_HUGE = 1_048_576
QUICK_SIZES = [64]
# Beyond this the materialised peer needs more than an H100/H200 holds (65536: ~80 GiB).
GPU_PEER_LIMIT = 32768
# The B = 1,048,576 step costs (1048576 / 65536)^2 = 256 times the B = 65536 one (40 ms at the
# target: 10 s). Beyond this predicted time it is skipped, so that `vlmfast bench all` on a GPU
# stays within a few minutes even while the kernel misses its target.
GPU_HUGE_BUDGET_S = 25.0
MIB = 2**20
# B x B x D products the CPU kernels run per forward + backward. InfoNCE's backward needs every
# row's and column's log-sum-exp before its first tile, so it recomputes the logits the forward
# made (4 products for the 3 of useful work: at best 75 % of the peak in useful TFLOP/s); SigLIP
# computes its gradient in the forward's pass (3). extra["kernel_tflops"]: the rate of them all.
CPU_KERNEL_PRODUCTS = {"infonce": 4, "siglip": 3}


def materialised(name: str):
    """The peer: open_clip's formulas on the B x B logits (ops/reference.py)."""
    return reference.infonce_loss if name == "infonce" else reference.siglip_loss


def fused(name: str):
    return ops.infonce_loss if name == "infonce" else ops.siglip_loss


def make_inputs(B: int, device, dtype, seed: int = 0):
    """Random features (never zeros) and scale / bias leaves; features generated on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.randn(B, D, generator=g, device=device, dtype=dtype).requires_grad_()
    txt = torch.randn(B, D, generator=g, device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(14.0, device=device).requires_grad_()
    bias = torch.tensor(-10.0, device=device).requires_grad_()
    return img, txt, scale, bias


def step(fn, name, img, txt, scale, bias):
    """One forward + backward; gradients overwritten, not accumulated."""
    for t in (img, txt, scale, bias):
        t.grad = None
    args = (img, txt, scale) if name == "infonce" else (img, txt, scale, bias)
    loss = fn(*args)
    loss.backward()
    return loss


def model_extra_mib(impl: str, B: int, dtype: torch.dtype, threads: int) -> float:
    """The memory the algorithm needs beyond inputs and gradients. Materialised: logits, the two
    log-softmaxes and their gradient, at least 4 B x B float32 (open_clip holds more). Fused:
    float32 copies of both features, the packed panels, per-thread d text partials (C++) or the
    logsumexps (Triton), all O(B D)."""
    if impl == "materialised":
        return 4 * B * B * 4 / MIB
    return (3 + threads) * B * D * 4 / MIB


def _time(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    # one warm-up call (first-call costs: custom-op setup, page faults): a step takes seconds here
    return time_ms(fn, device, warmup=1, repeats=repeats)


def _cuda_extra_mib(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


def step_peak_rss_mib(name: str, impl: str, B: int) -> float:
    """How far one CPU step raised this process's peak RSS above the RSS before it (MiB). The peak
    is VmHWM, reset to the current RSS just before the step (ru_maxrss would not do: Linux carries
    it over from the parent across fork and exec). Meaningful in a fresh process, where freed
    memory of earlier steps cannot hide the step's growth."""
    inputs = make_inputs(B, torch.device("cpu"), torch.float32)
    fn = fused(name) if impl == "vlmfast" else materialised(name)
    step(fn, name, *make_inputs(8, torch.device("cpu"), torch.float32))  # first-call allocations
    before = rss.status_mib("VmRSS")
    rss.reset_peak()
    step(fn, name, *inputs)
    return rss.status_mib("VmHWM") - before


def cpu_extra_mib(name: str, impl: str, B: int) -> float | None:
    """Peak-RSS growth of one step in a subprocess (None if the subprocess failed)."""
    code = f"from vlmfast.bench.losses import step_peak_rss_mib; print(step_peak_rss_mib({name!r}, {impl!r}, {B}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _extra_mib(name: str, impl: str, B: int, inputs, device: torch.device, quick: bool) -> float | None:
    fn = fused(name) if impl == "vlmfast" else materialised(name)
    if device.type == "cuda":
        return _cuda_extra_mib(lambda: step(fn, name, *inputs), device)
    if quick:  # in this process: tiny sizes, so the numbers only show that the path works
        try:
            return step_peak_rss_mib(name, impl, B)
        except OSError:  # no /proc/self/clear_refs
            return None
    return cpu_extra_mib(name, impl, B)


def run(device: torch.device, dtype: torch.dtype, quick: bool = False,
        losses: tuple[str, ...] = ("infonce", "siglip")) -> list[Result]:
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sizes = QUICK_SIZES if quick else (GPU_SIZES if on_gpu else CPU_SIZES)
    threads = 0 if on_gpu else torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    for name in losses:
        for B in sizes:
            inputs = make_inputs(B, device, dtype)
            with_peer = not on_gpu or B <= GPU_PEER_LIMIT
            repeats = 3 if B >= 4096 else 7
            ms = _time(lambda: step(fused(name), name, *inputs), device, repeats)
            peak = _extra_mib(name, "vlmfast", B, inputs, device, quick)
            peer_ms = peer_peak = None
            if with_peer:
                peer_ms = _time(lambda: step(materialised(name), name, *inputs), device, repeats)
                peer_peak = _extra_mib(name, "materialised", B, inputs, device, quick)
            results.append(Result(
                "losses", f"{name} B={B} D={D} {dtype_name} fwd+bwd", "vlmfast", ms,
                "materialised" if with_peer else None, peer_ms,
                # useful work: the three B x B x D products (logits, d img, d txt)
                tflops=3 * 2 * B * B * D / ms / 1e9, peak_mib=peak,
                extra={"peer_peak_mib": peer_peak,
                       "kernel_tflops": CPU_KERNEL_PRODUCTS[name] * 2 * B * B * D / ms / 1e9 if not on_gpu else None,
                       "model_mib": model_extra_mib("vlmfast", B, dtype, threads),
                       "peer_model_mib": model_extra_mib("materialised", B, dtype, threads) if with_peer else None},
            ))
            del inputs
        predicted_s = results[-1].ms * (GPU_HUGE / sizes[-1]) ** 2 / 1e3
        if on_gpu and not quick and predicted_s > GPU_HUGE_BUDGET_S:
            print(f"losses: {name} B={GPU_HUGE} skipped: {predicted_s:.0f} s predicted from B={sizes[-1]}",
                  file=sys.stderr)
        elif on_gpu and not quick:
            # One forward + backward at B = 1,048,576 (the peer would need ~16 TiB), timed and
            # measured in the same call: it takes seconds.
            inputs = make_inputs(GPU_HUGE, device, dtype)
            step(fused(name), name, *make_inputs(4096, device, dtype))  # compiled before the clock starts
            start = time.perf_counter()
            peak = _cuda_extra_mib(lambda: step(fused(name), name, *inputs), device)
            ms = (time.perf_counter() - start) * 1e3
            results.append(Result(
                "losses", f"{name} B={GPU_HUGE} D={D} {dtype_name} fwd+bwd", "vlmfast", ms,
                tflops=3 * 2 * GPU_HUGE**2 * D / ms / 1e9, peak_mib=peak,
                extra={"model_mib": model_extra_mib("vlmfast", GPU_HUGE, dtype, threads), "single_run": True},
            ))
            del inputs
    return results
