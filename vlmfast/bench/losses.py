"""Contrastive losses (InfoNCE, SigLIP), forward + backward: vlmfast's fused kernels against the
materialised computation (open_clip style: the B x B logits in memory) in the same run, with the
extra memory each needs (TARGETS.md: CPU B = 8192, D = 512 fp32 >= 2x faster with O(B D) memory;
H200 B = 65536 <= 40 ms with <= 1 GiB extra, and B = 1,048,576 runs).

    from benchmarks.losses import run
    rows = run("cpu")                    # B = 1024 .. 8192, D = 512, float32
    rows = run("cuda")                   # B = 4096 .. 65536 bf16 (+ B = 1,048,576 fused only)

    python -m benchmarks.losses [--device cuda] [--quick] [--no-memory] [--json out.jsonl]

Each row (a dict): loss, B, D, dtype, impl ("vlmfast" / "materialised"), ms (median forward +
backward to both features and the scale), speedup (materialised ms / vlmfast ms, on the vlmfast
row), extra_mib (measured peak memory beyond the inputs: torch.cuda.max_memory_allocated on a GPU;
on the CPU the growth of the peak RSS (VmHWM) of a fresh subprocess over one step, since
tracemalloc does not see torch's allocations) and model_extra_mib (what the algorithm must hold: B x B float32
matrices for the materialised loss, O(B D) feature copies and partials for the fused one).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from vlmfast import ops
from vlmfast.ops import reference

D = 512
CPU_SIZES = [1024, 2048, 4096, 8192]
GPU_SIZES = [4096, 16384, 32768, 65536]
GPU_HUGE = 1_048_576
QUICK_SIZES = [64, 96]
# Beyond this the materialised peer needs more than an H100/H200 holds (65536: ~80 GiB).
GPU_PEER_LIMIT = 32768
MIB = 2**20


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


def _time_cpu(fn, repeats: int) -> float:
    fn()  # warm up (first-call costs: custom-op setup, page faults)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _time(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    return _time_cpu(fn, repeats)


def _cuda_extra_mib(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child_peak_rss(name: str, impl: str, B: int) -> None:
    """Runs in a fresh process: prints how far one step raised the peak RSS above the RSS before
    it (MiB). The peak is the process's VmHWM, reset to the current RSS just before the step
    (ru_maxrss would not do: Linux carries it over from the parent across fork and exec)."""
    inputs = make_inputs(B, torch.device("cpu"), torch.float32)
    fn = fused(name) if impl == "vlmfast" else materialised(name)
    step(fn, name, *make_inputs(8, torch.device("cpu"), torch.float32))  # first-call allocations
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS
    step(fn, name, *inputs)
    print((_status_kib("VmHWM") - before) / 1024)


def cpu_extra_mib(name: str, impl: str, B: int) -> float | None:
    """Peak-RSS growth of one step in a subprocess (None if the subprocess failed)."""
    code = f"from benchmarks.losses import _child_peak_rss; _child_peak_rss({name!r}, {impl!r}, {B})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def run(device, dtype: torch.dtype | None = None, quick: bool = False, memory: bool = True,
        losses: tuple[str, ...] = ("infonce", "siglip")) -> list[dict]:
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    sizes = QUICK_SIZES if quick else (GPU_SIZES if on_gpu else CPU_SIZES)
    threads = 0 if on_gpu else torch.get_num_threads()
    rows = []
    for name in losses:
        for B in sizes:
            inputs = make_inputs(B, device, dtype)
            impls = ["vlmfast"] + (["materialised"] if not on_gpu or B <= GPU_PEER_LIMIT else [])
            timings = {}
            for impl in impls:
                fn = fused(name) if impl == "vlmfast" else materialised(name)
                repeats = 3 if B >= 4096 else 7
                ms = _time(lambda: step(fn, name, *inputs), device, repeats)
                timings[impl] = ms
                extra = None
                if memory:
                    extra = (_cuda_extra_mib(lambda: step(fn, name, *inputs), device) if on_gpu
                             else cpu_extra_mib(name, impl, B))
                rows.append(dict(
                    suite="losses", loss=name, B=B, D=D, dtype=str(dtype).removeprefix("torch."),
                    device=torch.cuda.get_device_name(device) if on_gpu else "cpu", impl=impl, ms=ms,
                    # useful work: the three B x B x D products (logits, d img, d txt)
                    tflops=3 * 2 * B * B * D / ms / 1e9,
                    extra_mib=extra, model_extra_mib=model_extra_mib(impl, B, dtype, threads),
                ))
            if "materialised" in timings:
                rows[-len(impls)]["speedup"] = timings["materialised"] / timings["vlmfast"]
            del inputs
        if on_gpu and not quick:
            # One forward + backward at B = 1,048,576: the peer would need ~16 TiB.
            inputs = make_inputs(GPU_HUGE, device, dtype)
            extra = _cuda_extra_mib(lambda: step(fused(name), name, *inputs), device)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(fused(name), name, *inputs)
            torch.cuda.synchronize(device)
            rows.append(dict(suite="losses", loss=name, B=GPU_HUGE, D=D, dtype=str(dtype).removeprefix("torch."),
                             device=torch.cuda.get_device_name(device), impl="vlmfast",
                             ms=(time.perf_counter() - start) * 1e3, extra_mib=extra,
                             model_extra_mib=model_extra_mib("vlmfast", GPU_HUGE, dtype, threads)))
            del inputs
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["loss", "B", "impl", "ms", "speedup", "extra MiB", "model MiB"]
    lines = []
    for r in rows:
        lines.append([r["loss"], str(r["B"]), r["impl"], f"{r['ms']:.1f}",
                      f"{r['speedup']:.2f}x" if r.get("speedup") else "",
                      f"{r['extra_mib']:.0f}" if r.get("extra_mib") is not None else "",
                      f"{r['model_extra_mib']:.0f}"])
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [header, *lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small batches: checks that every case runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--loss", choices=["infonce", "siglip"], action="append", help="default: both")
    parser.add_argument("--json", default=None, help="append the rows as JSON lines here")
    args = parser.parse_args(argv)
    rows = run(args.device, quick=args.quick, memory=not args.no_memory,
               losses=tuple(args.loss or ("infonce", "siglip")))
    print(format_table(rows))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
