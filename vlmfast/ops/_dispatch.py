"""The one backend policy: which kernel runs an op, asked the same way by every op.

    backend = _dispatch.select("rotary", x.device, x.dtype)   # "triton", "cpp", "cuda" or "reference"

Default order: CUDA tensors -> Triton, then the CUDA C++ kernels; CPU tensors -> C++; among the
backends that have a kernel for the op (KERNELS) and can run here. Anything else (float64, a
missing extension, no Triton, no kernel for the op) goes to the op's PyTorch path, "reference",
which gives the same answer. `VLMFAST_BACKEND=triton|cpp|cuda|reference` forces one: an op with
a kernel there runs it; an op without one takes its reference path (one warning per op); a
backend that cannot run on the tensors' device at all (cuda for CPU tensors) is ignored with one
warning. Forcing Triton on CPU tensors needs `TRITON_INTERPRET=1` (set before triton is
imported), which is how the tests run Triton kernels on a machine without a GPU.

A CUDA tensor whose op has a GPU kernel but lands on the reference (which materialises what the
kernels never hold, e.g. attention's L x S scores) warns once; `VLMFAST_STRICT=1` raises instead.

The choice is not the proof: the launchers record the kernel that ran in `calls`
(vlmfast/runtime/kernel_calls.py), the op layer its reference path (`record(op, "reference")`).
"""

import collections
import functools
import importlib.util
import os
import warnings

import torch

from vlmfast import _extension
from vlmfast.runtime.kernel_calls import calls, record  # noqa: F401  (the tests read calls here)

BACKENDS = ("triton", "cpp", "cuda", "reference")
DEFAULT_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The backends with a kernel for each op; the reference path covers every op. An op without a
# GPU kernel here (linear: cuBLAS through torch; patch_weight_grad: a gather kernel + a matmul)
# runs its PyTorch path on CUDA by design, so that path is no fallback there.
KERNELS = {
    "attention": ("triton", "cpp"),  # dense and varlen; no CUDA C++ kernel, Triton serves CUDA
    "rotary": ("triton", "cpp", "cuda"),
    "rope_2d": ("triton", "cpp", "cuda"),
    "infonce": ("triton", "cpp"),
    "siglip": ("triton", "cpp"),
    "patch_embed": ("triton", "cpp", "cuda"),  # cuda: the gather kernel, then cuBLAS
    "patch_gather": ("triton", "cpp", "cuda"),
    "patch_weight_grad": ("cpp",),
    "linear_cross_entropy": ("triton", "cpp"),
    "linear": ("cpp",),
    "swiglu": ("triton", "cpp"),
}
_GPU_KERNELS = ("triton", "cuda")
_EXTENSIONS = {"cpp": "_C", "cuda": "_C_cuda"}

_warned: set[tuple] = set()
# (op, backend) -> calls where a forced backend had no kernel for the op (the reference ran):
# the tests' `backend` fixture skips instead of failing when that is all a test did.
no_kernel: collections.Counter = collections.Counter()


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    return _parse_forced(os.environ.get("VLMFAST_BACKEND"))


def _parse_forced(value: str | None) -> str | None:
    value = (value or "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"VLMFAST_BACKEND: expected one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def _runs_on(backend: str, device_type: str) -> bool:
    """Whether `backend` can run on tensors of `device_type` on this machine."""
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_installed() and (device_type == "cuda" or triton_interpreting())
    if backend == "cpp":
        return device_type == "cpu" and _extension.load("_C") is not None
    if backend == "cuda":
        return device_type == "cuda" and _extension.load("_C_cuda") is not None
    return False


def select(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend whose kernel runs `op` (a key of KERNELS) on tensors of `device` and `dtype`.

    Cheap (one environment read and a cached lookup: it is asked on every call, decode steps
    included); the warnings and the strict check run only when the answer is a fallback."""
    forced = _backend_variable()
    device_type = device.type
    # TRITON_INTERPRET matters only to Triton on CPU tensors: read it only then.
    interpret = (os.environ.get("TRITON_INTERPRET")
                 if forced and device_type == "cpu" and "triton" in forced.lower() else None)
    backend, notices = _decide(op, device_type, dtype, forced, interpret)
    for notice in notices:
        _notify(*notice)
    return backend


# os.environ.get costs ~1.4 us when the variable is unset (the mapping raises and catches a
# KeyError), and select runs on every op call, a decode step's dozens included. On POSIX the
# mapping keeps its bytes-keyed dict in `_data`, which every os.environ write updates
# (monkeypatch.setenv too): read there, ~0.1 us. Elsewhere, os.environ.get.
_RAW_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _backend_variable() -> str | None:
    """os.environ.get("VLMFAST_BACKEND"), cheaply."""
    if _RAW_ENVIRON is None:
        return os.environ.get("VLMFAST_BACKEND")
    value = _RAW_ENVIRON.get(b"VLMFAST_BACKEND")
    return None if value is None else os.fsdecode(value)


@functools.cache
def _decide(op: str, device_type: str, dtype: torch.dtype, forced_value: str | None,
            interpret: str | None) -> tuple[str, tuple]:
    """(backend, notices): notices are (key, message, strict) to warn once about (or, strict,
    raise under VLMFAST_STRICT=1). The environment values are part of the cache key."""
    kernels = KERNELS[op]
    forced = _parse_forced(forced_value)
    notices = []
    if forced == "reference":
        return "reference", ()
    has_gpu_kernel = any(b in kernels for b in _GPU_KERNELS)
    fallback = device_type == "cuda" and has_gpu_kernel  # the reference would be a fallback
    if dtype not in KERNEL_DTYPES:
        if fallback:
            notices.append(_reference_notice(op, f"no kernel takes {dtype}"))
        return "reference", tuple(notices)
    if forced is not None:
        if _runs_on(forced, device_type):
            if forced in kernels:
                return forced, ()
            notices.append((("no kernel", op, forced),
                            f"VLMFAST_BACKEND={forced}: {op} has no {forced} kernel; it runs its "
                            "PyTorch reference path instead.", fallback))
            return "reference", tuple(notices)
        notices.append((
            ("forced", forced, device_type),
            f"VLMFAST_BACKEND={forced} cannot run on {device_type} tensors here"
            + (" (set TRITON_INTERPRET=1 before importing triton to run Triton on the CPU)"
               if forced == "triton" and device_type == "cpu" else "")
            + "; using the default order instead.",
            False,
        ))
    for backend in DEFAULT_ORDER.get(device_type, ()):
        if backend not in kernels:
            continue
        if _runs_on(backend, device_type):
            return backend, tuple(notices)
        extension = _EXTENSIONS.get(backend)
        if extension and _extension.load(extension) is None:
            _extension.warn_missing(extension, "next")
    if fallback:
        notices.append(_reference_notice(op, "no GPU kernel can run here (is triton installed?)"))
    return "reference", tuple(notices)


def _reference_notice(op: str, why: str) -> tuple:
    return (("reference on cuda", op, why),
            f"vlmfast: {op} on CUDA tensors falls back to its PyTorch reference ({why}), which "
            "materialises what the kernels never hold; set VLMFAST_STRICT=1 to make this an error.",
            True)


def _notify(key: tuple, message: str, strict: bool) -> None:
    if key[0] == "no kernel":
        no_kernel[key[1:]] += 1
    if strict and os.environ.get("VLMFAST_STRICT") == "1":
        raise RuntimeError(message.replace("; set VLMFAST_STRICT=1 to make this an error", "")
                           + " (VLMFAST_STRICT=1)")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
