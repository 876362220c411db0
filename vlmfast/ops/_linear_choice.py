"""Which GEMM runs a Linear on the CPU, vlmfast's or torch's: decided by measurement per shape
class, once per process, so that ops.linear is never slower than torch's own linear.

CPUs differ (torch's float32 GEMM is MKL, fast on Intel, slow on AMD; its bfloat16 GEMM is oneDNN,
on AMX where the CPU has it), and no rule written on one machine holds on the next. So the first
call of each class times both (interleaved, in this process, on this machine: the forward in
inference, forward + backward in training, through the same functions the op then runs) and gives
the class to torch when torch's best time is below vlmfast's. On a shared machine one sample is
at the mercy of whatever else runs (a descheduled thread stalls a 2-thread GEMM for a time
slice), so each side's time is its best of at least MIN_SAMPLES interleaved samples, and a close
call (best times within CLOSE of each other) takes more, up to MAX_SAMPLES or BUDGET_MS. A class:
the dtypes, N, K, M rounded up to a power of two and the work the calls do (ops/linear.py): a
forward on a cached packed weight ("cached", inference), a forward packing per call ("forward": a
prompt that keeps no packed copy, a frozen tower in a training step; "forward+pre" when it keeps
the pre-activation for a backward), or a backward forming some of the gradients ("backward:x", a
frozen layer passing the gradient on, to "backward:xwb"). Timing a forward-only call as forward +
backward (as the classes once were) handed such calls to whichever side had the faster backward.

VLMFAST_LINEAR_CHOICE=measure (default) | vlmfast | torch forces the choice (tests, comparisons,
and runs that must give the same bits in every process: which side wins a timing can differ from
one process to the next).
`decisions()` lists what was decided (the benchmarks print it).

The timing runs each side at least four times, which for a prefill-sized GEMM is seconds added to
a process's first call (a Qwen2-VL load + first generate took 7.4 s against 2.6 s without it). So
decisions are also kept on disk (choice_cache.py: one file per CPU model, thread count, torch and
vlmfast version, GEMM level and blocking) and a later process on the same machine starts from them.
"""

import os
import time

import torch

from vlmfast.ops import _choice_cache

MODES = ("measure", "vlmfast", "torch")
_mode = os.environ.get("VLMFAST_LINEAR_CHOICE", "measure").strip().lower() or "measure"
if _mode not in MODES:
    raise ValueError(f"VLMFAST_LINEAR_CHOICE: expected one of {MODES}, got {_mode!r}")

_decisions: dict[tuple, dict] = {}
MIN_SAMPLES = 3  # per side, after one warm-up call each
MAX_SAMPLES = 8
CLOSE = 0.10  # best times within 10% of each other: sample on (up to MAX_SAMPLES / BUDGET_MS)
BUDGET_MS = 1500.0  # timing spent per class beyond MIN_SAMPLES (a class is decided once per process)


def mode() -> str:
    return _mode


def set_mode(value: str) -> str:
    """Sets the mode (one of MODES); returns the previous one. Decisions made so far are dropped."""
    global _mode
    if value not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {value!r}")
    previous, _mode = _mode, value
    _decisions.clear()
    _choice_cache.forget_loaded()
    return previous


def shape_class(m: int, n: int, k: int, x_dtype, w_dtype, compute, work: str) -> tuple:
    """The class of an (m, k) x (n, k)^T call doing `work` (see the module's docstring)."""
    bucket = 1 << max(0, (m - 1).bit_length())
    return (str(x_dtype), str(w_dtype), str(compute), n, k, bucket, work)


def choose(key: tuple, make_ours, make_theirs) -> str:
    """"vlmfast" or "torch" for the class `key`; on its first call builds the two callables
    (make_ours(), make_theirs(): set-up such as packing stays out of the timing) and times them
    (one warm-up each, then interleaved samples, see the module's docstring). Under a forced
    mode, no timing."""
    if _mode != "measure":
        return _mode
    decision = _decisions.get(key)
    if decision is None and _choice_cache.load_into(_decisions):
        decision = _decisions.get(key)
    if decision is not None:
        return decision["backend"]
    with torch.no_grad():
        ours, theirs = make_ours(), make_theirs()
        ours_ms, theirs_ms, samples = _compare(ours, theirs)
    # torch whenever its best is below ours: the op must not run slower than torch's linear. (A
    # near tie may fall either way from one process to the next, and the results then differ in
    # the last bits: the tests force the choice.)
    backend = "torch" if theirs_ms < ours_ms else "vlmfast"
    _decisions[key] = {"backend": backend, "vlmfast_ms": ours_ms, "torch_ms": theirs_ms, "samples": samples}
    _choice_cache.save(_decisions)
    return backend


def _compare(ours, theirs) -> tuple[float, float, int]:
    """(best ms of ours, best ms of theirs, samples per side): interleaved, so that a load that
    comes and goes falls on both; the best sample is the least disturbed one."""
    ours()
    theirs()
    ours_ms = theirs_ms = float("inf")
    spent, samples = 0.0, 0
    while samples < MAX_SAMPLES:
        a, b = _once(ours), _once(theirs)
        ours_ms, theirs_ms = min(ours_ms, a), min(theirs_ms, b)
        samples += 1
        if samples >= MIN_SAMPLES:
            if abs(ours_ms - theirs_ms) > CLOSE * min(ours_ms, theirs_ms) or spent > BUDGET_MS:
                break
            spent += a + b
    return ours_ms, theirs_ms, samples


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def decisions() -> list[dict]:
    """Every class decided so far: its key fields, the backend and both times (ms)."""
    names = _choice_cache.FIELDS
    return [{**dict(zip(names, key)), **value} for key, value in _decisions.items()]
