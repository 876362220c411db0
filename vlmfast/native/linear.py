"""Launchers of the Linear GEMM in csrc/cpu/gemm.cpp (y = act(x W^T + b) and its backward).

Matrices cross the boundary as (address, (row stride, column stride), dtype tag), so transposed
operands (the backward's W and dz^T) need no copy. Operands are float32, bfloat16 or float16, and
computed in a `compute` dtype: float32; bfloat16 (AVX512-BF16 or AMX kernels where the CPU has
them, else the float32 kernels on operands rounded to bfloat16); float16 (exact in the float32
kernels). Accumulation is float32 in every case.

The weight is packed into 32-column panels before a GEMM (`pack` -> Packed, whose layout depends
on the compute dtype and the instruction set in use); in inference (no autograd, weight unchanged)
the packed copy is cached per weight, keyed by its storage, version counter, shape, strides,
compute dtype and the instruction set, so a frozen model packs each weight once. A weight not
kept packed, with few rows of x against it (a prompt, a Q-Former's queries, a small batch in
training), is handed over as it is (`operand` -> Unpacked) and packed slice by slice inside the
GEMM's tasks: read from memory once, instead of packed whole, written back and read again.

The instruction set is chosen at run time (`isa()`); VLMFAST_GEMM_ISA=amx|avx512_bf16|avx512|
avx2|portable (read at the first GEMM) or `force_isa(name)` caps it, for tests and comparisons.
"""

import threading
import weakref
from typing import NamedTuple

import torch

from vlmfast.native._common import DTYPE_TAGS, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native

# Must match csrc/cpu/gemm.h (enum class Activation, GemmIsa, PackedFormat).
ACTIVATION_TAGS = {None: 0, "quick_gelu": 1, "gelu_tanh": 2, "gelu": 3}
ISA_NAMES = ("portable", "avx2", "avx512", "avx512_bf16", "amx")
FORMAT_NAMES = ("f32", "bf16_pairs")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Packed(NamedTuple):
    """B packed for the GEMM: `data` (bytes), its layout, the compute dtype its values were
    rounded to, and B's (N, K)."""

    data: torch.Tensor
    format: int
    compute: torch.dtype
    n: int
    k: int


class Unpacked(NamedTuple):
    """B (N, K), any strides, left as it is: the GEMM packs each slice of it as it sweeps it, its
    values rounded to `compute`."""

    source: torch.Tensor
    compute: torch.dtype

    @property
    def n(self) -> int:
        return self.source.shape[0]


# id(weight) -> (weak reference to weight, key, Packed). Keyed by id (a tensor's == is
# elementwise, so tensors cannot be dict keys); the entry leaves with the weight.
_packed_cache: dict[int, tuple] = {}
# Bumped whenever the instruction set is forced: cached panels of another layout are stale.
_isa_generation = [0]


def _module():
    return module_for(torch.device("cpu"))


def isa() -> str:
    """The instruction set the GEMM uses now (the best this CPU and OS allow, or as forced)."""
    return _module().gemm_isa()


def available_isas() -> list[str]:
    """The instruction sets this CPU can run, lowest first (AMX only where the OS granted it)."""
    module = _module()
    return [name for i, name in enumerate(ISA_NAMES) if module.gemm_isa_available(i)]


def force_isa(name: str | None) -> str:
    """Caps the instruction set at `name` (None: back to automatic); returns the one now in use
    (lowered to what the CPU can run)."""
    if name is not None and name not in ISA_NAMES:
        raise ValueError(f"isa: expected one of {ISA_NAMES} or None, got {name!r}")
    _isa_generation[0] += 1
    return _module().gemm_force_isa(-1 if name is None else ISA_NAMES.index(name))


def emulate_amx(on: bool) -> None:
    """Tests only: makes the "amx" level available on a CPU with AVX512-BF16 but no AMX, its
    kernel running on emulated tiles (the real kernel's layout and addressing; slow), so that
    the AMX packing and driver are tested where AMX cannot run. The level is chosen again."""
    _isa_generation[0] += 1
    _module().gemm_emulate_amx(bool(on))


def describe() -> dict:
    """What the GEMM chose here: instruction set, cache sizes (and their source), blocking."""
    out = {}
    for line in _module().gemm_describe().splitlines():
        key, _, value = line.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def measure_peak(compute: torch.dtype, ms: float = 30.0, threads: int | None = None) -> float:
    """TFLOP/s of this machine's micro-kernel for `compute` operands at the instruction set in
    use, every thread at once on L1-resident operands (best of three runs of ~ms each, timed in
    each thread's CPU time): the roof the GEMMs' percentages refer to."""
    return _module().gemm_measure_peak(compute_dtype=DTYPE_TAGS[compute], ms=ms,
                                       threads=threads or torch.get_num_threads())


def _matrix(t: torch.Tensor) -> tuple[int, tuple[int, int]]:
    return t.data_ptr(), (t.stride(0), t.stride(1))


class _Scratch(threading.local):
    buffer: torch.Tensor | None = None


_scratch = _Scratch()


def _scratch_bytes(count: int, device: torch.device) -> torch.Tensor:
    """`count` bytes of this thread's packing buffer, grown to the largest size asked. Panels
    packed for one GEMM are dead when it returns, and a fresh buffer of tens of MiB costs a page
    fault per 4 KiB on first touch: re-packing into the same memory was ~1 s of a SmolVLM2
    fine-tuning step (several hundred MiB of panels per step)."""
    buffer = _scratch.buffer
    if buffer is None or buffer.numel() < count or buffer.device != device:
        _scratch.buffer = None  # the old buffer goes before the new one is made
        buffer = _scratch.buffer = torch.empty(count, dtype=torch.uint8, device=device)
    return buffer[:count]


def pack(b: torch.Tensor, compute: torch.dtype | None = None, *, scratch: bool = False) -> Packed:
    """B (N, K), any strides, float32/bfloat16/float16 -> its 32-column panels for operands
    computed in `compute` (default: b's dtype). scratch: into this thread's reused packing buffer
    (valid until the next scratch pack: for a GEMM about to run)."""
    module = module_for(b.device)
    compute = compute or b.dtype
    n, k = b.shape
    fmt = module.gemm_packed_format(DTYPE_TAGS[compute])
    size = module.gemm_packed_b_bytes(n, k, fmt)
    data = _scratch_bytes(size, b.device) if scratch else torch.empty(size, dtype=torch.uint8, device=b.device)
    address, strides = _matrix(b)
    module.gemm_pack_b(b=address, b_strides=strides, b_dtype=DTYPE_TAGS[b.dtype], N=n, K=k,
                       compute_dtype=DTYPE_TAGS[compute], format=fmt, packed=data.data_ptr(),
                       **launch_args(b.device))
    return Packed(data, fmt, compute, n, k)


def operand(b: torch.Tensor, compute: torch.dtype | None = None, *, rows: int) -> Packed | Unpacked:
    """B (N, K) ready for one GEMM against `rows` rows of A: left unpacked where the GEMM packs it
    inside its tasks to advantage (the rows fit one or two cache blocks: each slice is packed once
    per block), else packed into this thread's scratch buffer (valid until the next scratch pack)."""
    compute = compute or b.dtype
    module = module_for(b.device)
    if b.device.type == "cpu" and module.gemm_packs_in_tasks(M=rows, N=b.shape[0], compute_dtype=DTYPE_TAGS[compute],
                                                             **launch_args(b.device)):
        return Unpacked(b, compute)
    return pack(b, compute, scratch=True)


def packed_weight(weight: torch.Tensor, cache: bool, compute: torch.dtype | None = None, *,
                  rows: int) -> Packed | Unpacked:
    """weight (N, K) ready for a GEMM against `rows` rows of x. With `cache`, a packed copy is kept
    from the weight's second use on (same data, version, layout and compute dtype) and reused
    while those stay: a weight used once (a VLM's vision tower and decoder prefill in one
    generate) costs no second copy, one used again (a served or frozen model) is packed once.
    Else `operand`: unpacked, or packed into the scratch buffer."""
    compute = compute or weight.dtype
    if not cache or weight.is_inference():  # inference tensors keep no version counter
        return operand(weight, compute, rows=rows)
    key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), weight._version,
           tuple(weight.shape), weight.stride(), weight.dtype, compute, _isa_generation[0])
    ident = id(weight)
    hit = _packed_cache.get(ident)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        if hit[2] is not None:
            return hit[2]
        packed = pack(weight, compute)  # its second use: keep a copy from now on
        _packed_cache[ident] = (hit[0], key, packed)
        return packed
    # first use (or the weight changed): remember it, use it as it is for now
    _packed_cache[ident] = (weakref.ref(weight, lambda _, i=ident: _packed_cache.pop(i, None)), key, None)
    return operand(weight, compute, rows=rows)


def cached_bytes() -> int:
    """Bytes held by the cached packed weights."""
    return sum(entry[2].data.numel() for entry in _packed_cache.values() if entry[2] is not None)


def gemm(a: torch.Tensor, b: Packed | Unpacked, bias: torch.Tensor | None = None, activation: str | None = None,
         keep_pre: bool = False, out_dtype: torch.dtype | None = None):
    """act(a (M, K) @ B^T + bias) -> (out (M, N), pre (M, N) or None) in out_dtype (default:
    b's compute dtype); a's values are rounded to b's compute dtype. B packed by `pack`, or left
    unpacked by `operand`."""
    module = module_for(a.device)
    record_native("linear", a.device)
    m, k = a.shape
    n = b.n
    out_dtype = out_dtype or b.compute
    out = _alloc.empty(m, n, dtype=out_dtype, device=a.device)
    pre = _alloc.empty(m, n, dtype=out_dtype, device=a.device) if keep_pre else None
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    address, strides = _matrix(a)
    if isinstance(b, Unpacked):
        b_address, b_strides = _matrix(b.source)
        run, b_args = module.gemm_forward_unpacked, dict(b=b_address, b_strides=b_strides,
                                                          b_dtype=DTYPE_TAGS[b.source.dtype])
    else:
        run, b_args = module.gemm_forward, dict(b_packed=b.data.data_ptr(), format=b.format)
    run(
        a=address, a_strides=strides, a_dtype=DTYPE_TAGS[a.dtype], **b_args, compute_dtype=DTYPE_TAGS[b.compute],
        bias=bias.data_ptr() if bias is not None else 0, M=m, N=n, K=k,
        activation=ACTIVATION_TAGS[activation], out=out.data_ptr(), out_dtype=DTYPE_TAGS[out_dtype], ldo=n,
        pre=pre.data_ptr() if pre is not None else 0, ldp=n, **launch_args(a.device),
    )
    return out, pre


def epilogue_backward(grad: torch.Tensor, pre: torch.Tensor | None, activation: str | None,
                      need_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad (M, N) -> (dz = grad * act'(pre) in grad's dtype (grad itself without an activation),
    db = float32 sum of dz over rows (N,) or None), in one pass over grad."""
    grad = grad.contiguous()
    m, n = grad.shape
    dz = _alloc.empty_like(grad) if activation is not None else grad
    db = _alloc.empty(n, dtype=torch.float32, device=grad.device) if need_bias else None
    if activation is None and db is None:
        return dz, None
    pre = pre.to(grad.dtype).contiguous() if activation is not None else None
    module_for(grad.device).linear_epilogue_backward(
        grad=grad.data_ptr(), pre=pre.data_ptr() if pre is not None else 0,
        grad_pre=dz.data_ptr() if activation is not None else 0,
        grad_bias=db.data_ptr() if db is not None else 0, M=m, N=n,
        activation=ACTIVATION_TAGS[activation], dtype=DTYPE_TAGS[grad.dtype], **launch_args(grad.device),
    )
    return dz, db


def kernel_calls() -> dict[str, int]:
    """GEMMs run so far by each instruction set's kernel (float32 operands run the AVX-512
    kernel at the levels above it): the tests' proof that a forced path ran."""
    module = _module()
    return {name: module.gemm_kernel_calls(i) for i, name in enumerate(ISA_NAMES)}
