"""What a result was measured on, and the machine's measured peaks (for percent-of-peak)."""

import datetime
import os
import platform
import subprocess

import torch

import vlmfast
from vlmfast.bench.timing import time_ms
from vlmfast.runtime import cpuinfo


def _cpu_model() -> str:
    """The CPU's model name with its family / model numbers and the GEMM-relevant instruction
    sets ("AMD EPYC (family 26 model 2; avx512, avx512_bf16)"): virtual machines often report a
    bare "AMD EPYC", which does not tell one generation from the next."""
    fields = cpuinfo.first_cpu()
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    sets = [s for s in ("avx512f", "avx512_bf16", "amx_tile") if s in flags]
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    if sets:
        details.append(", ".join(s.replace("avx512f", "avx512").replace("amx_tile", "amx") for s in sets))
    return f"{name} ({'; '.join(details)})" if details else name


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(vlmfast.__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vlmfast": vlmfast.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
    }
    try:
        from vlmfast import _extension

        native = _extension.load("_C")
        info["cpu_features"] = native.cpu_features() if native else None
    except Exception:  # noqa: BLE001 - description only
        info["cpu_features"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def _gemm_peak_cpu(dtype: torch.dtype) -> tuple[float | None, str]:
    """The micro-kernel's own rate on L1-resident operands, all threads at once (the roof of
    every CPU GEMM here); None without the C++ extension."""
    try:
        from vlmfast.native import linear as native_linear

        compute = dtype if dtype in native_linear.DTYPES else torch.float32
        if compute == torch.float16:  # float16 runs the float32 kernels
            compute = torch.float32
        peak = native_linear.measure_peak(compute, ms=30.0)
        isa = native_linear.isa()
        if compute == torch.float32 and isa in ("avx512_bf16", "amx"):
            isa = "avx512"  # float32 operands run the AVX-512 kernel at the levels above it
        return peak, f"vlmfast {isa} micro-kernel, {str(compute).removeprefix('torch.')}"
    except Exception:  # noqa: BLE001 - no extension: the torch GEMM rate stands in
        return None, "torch GEMM"


def measured_peaks(device: torch.device, dtype: torch.dtype) -> dict:
    """TFLOP/s of the machine's GEMM and GB/s of a large copy, measured now on `device`.

    On the CPU `gemm_tflops` is the peak of the GEMM micro-kernel itself for `dtype` (float32 or
    bfloat16 operands, the instruction set in use), so a GEMM's "% peak" is its share of what the
    cores can do, never above 100 %; `torch_gemm_tflops` is torch's large GEMM in the same run
    (what used to stand in for the peak). On a GPU, a large torch GEMM."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch_tflops = 2 * n**3 / time_ms(lambda: a @ b, device, repeats=5) / 1e9
    src = torch.empty(256 * 2**20 if device.type == "cuda" else 64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, repeats=5)
    peaks = {"gemm_tflops": torch_tflops, "gemm_source": "torch GEMM", "torch_gemm_tflops": torch_tflops,
             "copy_gbps": 2 * src.numel() / copy_ms / 1e6}
    if device.type == "cpu":
        kernel, source = _gemm_peak_cpu(dtype)
        if kernel:
            peaks.update(gemm_tflops=kernel, gemm_source=source)
    return peaks


def remeasure_cpu_peak(peaks: dict, dtype: torch.dtype) -> None:
    """Measures the micro-kernel's peak again after the suites and keeps the larger of the two.

    Thread CPU time shields the measurement from other processes in the guest, not from the
    hypervisor: time a virtual CPU is stolen still counts as the thread's. One ~0.1 s measurement
    taken during such a stretch gave half the bf16 peak (0.23 against 0.44 TFLOP/s on a 2-core
    Zen 4 VM) and GEMMs at 150 % of it; a second measurement minutes later rarely shares the
    disturbance."""
    kernel, source = _gemm_peak_cpu(dtype)
    if kernel and kernel > peaks["gemm_tflops"]:
        peaks.update(gemm_tflops=kernel, gemm_source=source)
