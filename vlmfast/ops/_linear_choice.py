"""Which GEMM runs a Linear on the CPU, vlmfast's or torch's: decided by measurement per shape
class, once per process, so that ops.linear is never slower than torch's own linear.

CPUs differ (torch's float32 GEMM is MKL, fast on Intel, slow on AMD; its bfloat16 GEMM is oneDNN,
on AMX where the CPU has it), and no rule written on one machine holds on the next. So the first
call of each class times both (interleaved, best of a few, in this process, on this machine:
the forward in inference, forward + backward in training) and gives the class to torch when
torch's time is more than MARGIN below vlmfast's. A class: the dtypes, N, K, M rounded up to a
power of two and whether the packed weight is cached (inference) or packed per call (training).

VLMFAST_LINEAR_CHOICE=measure (default) | vlmfast | torch forces the choice (tests, comparisons,
and runs that must give the same bits in every process: which side wins a timing can differ from
one process to the next).
`decisions()` lists what was decided (the benchmarks print it).
"""

import os
import time

import torch

MODES = ("measure", "vlmfast", "torch")
_mode = os.environ.get("VLMFAST_LINEAR_CHOICE", "measure").strip().lower() or "measure"
if _mode not in MODES:
    raise ValueError(f"VLMFAST_LINEAR_CHOICE: expected one of {MODES}, got {_mode!r}")

_decisions: dict[tuple, dict] = {}
_REPEATS = 2
MARGIN = 0.05  # torch's time must be this much below ours for a class to go to torch


def mode() -> str:
    return _mode


def set_mode(value: str) -> str:
    """Sets the mode (one of MODES); returns the previous one. Decisions made so far are dropped."""
    global _mode
    if value not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {value!r}")
    previous, _mode = _mode, value
    _decisions.clear()
    return previous


def shape_class(m: int, n: int, k: int, x_dtype, w_dtype, compute, cached: bool) -> tuple:
    bucket = 1 << max(0, (m - 1).bit_length())
    return (str(x_dtype), str(w_dtype), str(compute), n, k, bucket, cached)


def choose(key: tuple, make_ours, make_theirs) -> str:
    """"vlmfast" or "torch" for the class `key`; on its first call builds the two callables
    (make_ours(), make_theirs(): set-up such as packing stays out of the timing) and times them
    (one warm-up each, then interleaved best of two). Under a forced mode, no timing."""
    if _mode != "measure":
        return _mode
    decision = _decisions.get(key)
    if decision is not None:
        return decision["backend"]
    with torch.no_grad():
        ours, theirs = make_ours(), make_theirs()
        ours()
        theirs()
        ours_ms, theirs_ms = float("inf"), float("inf")
        for _ in range(_REPEATS):
            ours_ms = min(ours_ms, _once(ours))
            theirs_ms = min(theirs_ms, _once(theirs))
    # torch only when clearly faster: within the noise of a few samples the two are a coin toss,
    # and a class flipping between processes makes their results differ in the last bits
    backend = "torch" if theirs_ms < ours_ms * (1.0 - MARGIN) else "vlmfast"
    _decisions[key] = {"backend": backend, "vlmfast_ms": ours_ms, "torch_ms": theirs_ms}
    return backend


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def decisions() -> list[dict]:
    """Every class decided so far: its key fields, the backend and both times (ms)."""
    names = ("x_dtype", "w_dtype", "compute", "n", "k", "m_bucket", "cached")
    return [{**dict(zip(names, key)), **value} for key, value in _decisions.items()]
