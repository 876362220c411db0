"""What the Triton kernels and their launchers share: the matrix-multiply helper, rounding, the
device guard and grid checks of every launch, the per-arch tile tables and their tuning, and the
description of one compile (`Variant`) that vlmfast.kernels.compile_all reads.

Every launcher picks its tiles from a table in its own module (a function of the problem and the
target: "sm_90", "sm_80" or "interpreter") and launches through `launch`. The same module lists,
in `variants()`, every (kernel, constexprs, tile config, dtype) its launchers can choose, so
compile_all compiles exactly what can run.
"""

import contextlib
import dataclasses
import functools
import inspect
import os
import time

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run kernels without a GPU) truncates
# float32 -> bfloat16 instead of rounding to nearest even as the GPU does. Kernels round by hand
# before the cast when this is set, so interpreted results carry the GPU's rounding error.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# VLMFAST_TUNE=1: on a GPU, time every candidate tile config of a launch the first time its key
# (shapes class, dtype, flags) is seen, and keep the fastest (see `choose`).
TUNE = os.environ.get("VLMFAST_TUNE", "0") == "1"

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(TRITON_DTYPES)

# VLMFAST_KERNEL_REPORT=FILE: each distinct compiled kernel a launch runs appends one JSON line
# (kernel, its constexprs and launch options, registers, spills, shared memory as the GPU's
# driver reports them) to FILE. benchmarks/gpu_check.sh sets it: the runtime check of what
# compile_all checks without a GPU.
KERNEL_REPORT = os.environ.get("VLMFAST_KERNEL_REPORT")
_reported: set = set()

# CUDA launch limits: grid axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@triton.jit
def _round_to_bfloat16(v):
    # float32 -> the nearest bfloat16 value (ties to even), still held in float32.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dtype_of(v, ptr, ROUND_BF16: tl.constexpr):
    """v (float32) in the element type of `ptr`, rounded to nearest even."""
    if ROUND_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = _round_to_bfloat16(v)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """a @ b (+ acc) with float32 accumulation. The interpreter's dot multiplies bfloat16 as raw
    bits: it gets float32 operands there (exact products of 16-bit values, the same float32 sums
    as the tensor cores). The switch is a constexpr argument: a @triton.jit function may read
    only constexpr globals on a GPU."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not drop to TF32 (1e-5 relative is the contract); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- targets


def target_of(device: torch.device) -> str:
    """The tile table a launch on `device` reads: "interpreter" (CPU tensors under
    TRITON_INTERPRET=1), "sm_90" (Hopper and newer: 227 KiB of shared memory a block) or "sm_80"
    (Ampere, Ada: 99-163 KiB)."""
    if device.type != "cuda":
        return "interpreter"
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    return "sm_90" if major >= 9 else "sm_80"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (an H100's) under the interpreter, so that the
    tests take the same launch decisions as a GPU."""
    if device.type != "cuda":
        return 132
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_ok(grid: tuple) -> bool:
    return len(grid) <= 3 and all(0 <= g <= limit for g, limit in zip(grid, GRID_LIMITS))


def check_grid(grid: tuple, what: str) -> tuple:
    """The grid unchanged, or a ValueError naming the launch and the limit it passes."""
    if not grid_ok(grid):
        raise ValueError(
            f"{what}: launch grid {tuple(grid)} exceeds CUDA's limits {GRID_LIMITS[: len(grid)]} "
            "(the problem is too large for one launch)"
        )
    return grid


def device_guard(tensor: torch.Tensor):
    """`torch.cuda.device(tensor.device)` for a CUDA tensor (Triton launches on the current
    device: a tensor on cuda:1 must not run on cuda:0), nothing otherwise."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def launch(kernel, grid: tuple, *args, **kwargs):
    """kernel[grid](*args, **kwargs) on the device of the first tensor argument, after checking the
    grid against CUDA's limits. Every launcher launches through here."""
    check_grid(grid, kernel_name(kernel))
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    with device_guard(tensor):
        compiled = kernel[grid](*args, **kwargs)
    if KERNEL_REPORT and tensor.is_cuda:
        _report(kernel, compiled, kwargs, tensor.device)
    return compiled


def _report(kernel, compiled, kwargs: dict, device: torch.device) -> None:
    import json

    constants = {k: v for k, v in sorted(kwargs.items()) if isinstance(v, (bool, int, str))}
    key = (kernel_name(kernel), tuple(constants.items()), device.index)
    if key in _reported or compiled is None:
        return
    _reported.add(key)
    record = {"kernel": kernel_name(kernel), "config": constants, "device": torch.cuda.get_device_name(device),
              "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
              "shared_bytes": getattr(getattr(compiled, "metadata", None), "shared", None)}
    with open(KERNEL_REPORT, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- tuning

_tuned: dict = {}


def choose(name: str, key: tuple, candidates: list[dict], run) -> dict:
    """The tile config for one launch: the table's first candidate (the default), or with
    VLMFAST_TUNE=1 on a GPU the fastest of the candidates, timed once per (name, key) by calling
    run(config) (which launches and returns Triton's compiled kernel). A candidate that spills
    registers is not kept."""
    if len(candidates) == 1 or not TUNE or INTERPRETING:
        return candidates[0]
    full_key = (name, key)
    if full_key not in _tuned:
        _tuned[full_key] = _fastest(candidates, run)
    return _tuned[full_key]


def _fastest(candidates: list[dict], run) -> dict:
    best, best_time = candidates[0], float("inf")
    for config in candidates:
        compiled = run(config)  # compiles, and warms the caches
        if getattr(compiled, "n_spills", 0) and config is not candidates[0]:
            continue
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            run(config)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = config, elapsed
    return best


def launch_options(config: dict) -> dict:
    """The launch options of a tile config (num_warps, num_stages)."""
    return {k: v for k, v in config.items() if k.startswith("num_")}


def tiles(config: dict) -> dict:
    """The constexpr block sizes of a tile config."""
    return {k: v for k, v in config.items() if not k.startswith("num_")}


# ----------------------------------------------------------------------------- compile variants


def kernel_name(kernel) -> str:
    return kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__


def kernel_params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each argument of a @triton.jit kernel, compiled or interpreted
    (under TRITON_INTERPRET=1 the kernel is an InterpretedFunction without `params`)."""
    if hasattr(kernel, "params"):
        return [(p.name, p.is_constexpr) for p in kernel.params]
    signature = inspect.signature(kernel.fn)
    return [(name, p.annotation is tl.constexpr) for name, p in signature.parameters.items()]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile of one kernel, as a launcher can launch it.

    kernel: the @triton.jit function; types: Triton type of each runtime argument ("*bf16",
    "i32", "fp32", ...; an argument not named is "i32"); constexprs: every constexpr argument;
    options: num_warps / num_stages; dtype: the data dtype it is compiled for; default: whether
    the launcher picks this config without tuning (compile_all fails on spills only there);
    case: a short label of the problem class the table maps here (head dim, flags); ints: the
    integer arguments of a representative launch (contiguous tensors of that class), which
    compile_all specialises as Triton does at launch (1 -> a constant, multiples of 16 ->
    divisible by 16): the same code, registers and spills as the GPU will compile."""

    kernel: object
    types: dict
    constexprs: dict
    options: dict
    dtype: torch.dtype
    default: bool = True
    case: str = ""
    ints: dict = dataclasses.field(default_factory=dict)

    def signature(self) -> dict:
        # `types` may name arguments of a module's other kernels; a pointer left out would
        # default to i32 and fail to compile, loudly.
        params = kernel_params(self.kernel)
        missing = {name for name, constexpr in params if constexpr} - set(self.constexprs)
        if missing:
            raise ValueError(f"{self.name}: constexprs missing: {sorted(missing)}")
        return {name: "constexpr" if constexpr else self.types.get(name, "i32") for name, constexpr in params}

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)

    def describe(self) -> dict:
        """The config as compile_all writes it: dtype, case, constexprs and launch options."""
        return {"dtype": str(self.dtype).replace("torch.", ""), "case": self.case, "default": self.default,
                **self.constexprs, **self.options}


def variants_of(kernel, table: list[tuple], types, dtypes=KERNEL_DTYPES) -> list[Variant]:
    """Variants of `kernel` from (case, constexprs, candidate configs) rows, for each dtype:
    `types(dtype)` gives the argument types; the first candidate of a row is its default."""
    out = []
    for dtype in dtypes:
        for case, constexprs, candidates in table:
            for i, config in enumerate(candidates):
                out.append(Variant(kernel, types(dtype), {**constexprs(dtype), **tiles(config)},
                                   launch_options(config), dtype, default=i == 0, case=case))
    return out
