"""Backend choice for every op: by device, overridable with VLMFAST_BACKEND.

Default order: CUDA tensors -> Triton, then the CUDA C++ kernels; CPU tensors -> C++. Anything a
backend cannot run (float64, a missing extension, no Triton) goes to the next one and finally to
the PyTorch reference, which gives the same answer. `VLMFAST_BACKEND=triton|cpp|cuda|reference`
forces one; forcing Triton on CPU tensors needs `TRITON_INTERPRET=1` (set before triton is
imported), which is how the tests run Triton kernels on a machine without a GPU.
"""

import collections
import functools
import importlib.util
import os
import warnings

import torch

from vlmfast import _extension

BACKENDS = ("triton", "cpp", "cuda", "reference")
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (op, backend) -> number of calls that ran there. Tests read it to prove a forced backend ran.
calls: collections.Counter = collections.Counter()
_warned: set[tuple] = set()


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    value = os.environ.get("VLMFAST_BACKEND", "").strip().lower()
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


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(op: str, device: torch.device, dtype: torch.dtype, order: dict | None = None) -> str:
    """The backend that runs `op` for tensors on `device` of `dtype`, and count the call."""
    backend = _choose(device.type, dtype, order or DEFAULT_ORDER)
    calls[(op, backend)] += 1
    return backend


def _choose(device_type: str, dtype: torch.dtype, order: dict) -> str:
    if dtype not in KERNEL_DTYPES:
        return "reference"
    candidates = order.get(device_type, ("reference",))
    forced = forced_backend()
    if forced is not None:
        if _runs_on(forced, device_type):
            return forced
        _warn_once(
            ("forced", forced, device_type),
            f"VLMFAST_BACKEND={forced} cannot run on {device_type} tensors here"
            + (" (set TRITON_INTERPRET=1 before importing triton to run Triton on the CPU)"
               if forced == "triton" and device_type == "cpu" else "")
            + "; using the default order instead.",
        )
    for backend in candidates:
        if _runs_on(backend, device_type):
            return backend
        extension = {"cpp": "_C", "cuda": "_C_cuda"}.get(backend)
        if extension and _extension.load(extension) is None:
            _extension.warn_missing(extension, "next")
    return "reference"
