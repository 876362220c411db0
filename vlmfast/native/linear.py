"""Launchers of the float32 GEMM in csrc/cpu/gemm.cpp (y = act(x W^T + b) and its backward).

Matrices cross the boundary as (address, (row stride, column stride)), so transposed operands
(the backward's W and dz^T) need no copy. The weight is packed into 32-column panels before a
GEMM; in inference (no autograd, weight unchanged) the packed copy is cached per weight, keyed by
its storage, its version counter, shape and strides, so a frozen model packs each weight once.
"""

import threading
import weakref

import torch

from vlmfast.native._common import launch_args, module_for
from vlmfast.runtime import alloc as _alloc

# Must match csrc/cpu/gemm.h (enum class Activation).
ACTIVATION_TAGS = {None: 0, "quick_gelu": 1, "gelu_tanh": 2, "gelu": 3}

# id(weight) -> (weak reference to weight, key, packed). Keyed by id (a tensor's == is
# elementwise, so tensors cannot be dict keys); the entry leaves with the weight.
_packed_cache: dict[int, tuple] = {}


def _matrix(t: torch.Tensor) -> tuple[int, tuple[int, int]]:
    return t.data_ptr(), (t.stride(0), t.stride(1))


class _Scratch(threading.local):
    buffer: torch.Tensor | None = None


_scratch = _Scratch()


def _scratch_floats(count: int, device: torch.device) -> torch.Tensor:
    """`count` float32 of this thread's packing buffer, grown to the largest size asked. Panels
    packed for one GEMM are dead when it returns, and a fresh buffer of tens of MiB costs a page
    fault per 4 KiB on first touch: re-packing into the same memory was ~1 s of a SmolVLM2
    fine-tuning step (several hundred MiB of panels per step)."""
    buffer = _scratch.buffer
    if buffer is None or buffer.numel() < count or buffer.device != device:
        _scratch.buffer = None  # the old buffer goes before the new one is made
        buffer = _scratch.buffer = torch.empty(count, dtype=torch.float32, device=device)
    return buffer[:count]


def pack(b: torch.Tensor, *, scratch: bool = False) -> torch.Tensor:
    """B (N, K) float32, any strides -> its 32-column panels (flat float32). scratch: into this
    thread's reused packing buffer (valid until the next scratch pack: for a GEMM about to run)."""
    module = module_for(b.device)
    n, k = b.shape
    size = module.gemm_packed_b_size(n, k)
    packed = _scratch_floats(size, b.device) if scratch else torch.empty(size, dtype=torch.float32, device=b.device)
    address, strides = _matrix(b)
    module.gemm_pack_b(b=address, b_strides=strides, N=n, K=k, packed=packed.data_ptr(), **launch_args(b.device))
    return packed


def packed_weight(weight: torch.Tensor, cache: bool) -> torch.Tensor:
    """weight (N, K) packed; with `cache`, reused while the weight's data and version stay."""
    if not cache or weight.is_inference():  # inference tensors keep no version counter
        return pack(weight, scratch=True)
    key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), weight._version,
           tuple(weight.shape), weight.stride())
    ident = id(weight)
    hit = _packed_cache.get(ident)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    packed = pack(weight)
    _packed_cache[ident] = (weakref.ref(weight, lambda _, i=ident: _packed_cache.pop(i, None)), key, packed)
    return packed


def gemm(a: torch.Tensor, b_packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
         activation: str | None = None, keep_pre: bool = False):
    """act(a (M, K) @ B^T + bias) -> (out (M, n), pre (M, n) or None); B packed by `pack`."""
    module = module_for(a.device)
    m, k = a.shape
    out = _alloc.empty(m, n, dtype=torch.float32, device=a.device)
    pre = _alloc.empty(m, n, dtype=torch.float32, device=a.device) if keep_pre else None
    if bias is not None:
        bias = bias.contiguous()
    address, strides = _matrix(a)
    module.gemm_forward(
        a=address, a_strides=strides, b_packed=b_packed.data_ptr(),
        bias=bias.data_ptr() if bias is not None else 0, M=m, N=n, K=k,
        activation=ACTIVATION_TAGS[activation], out=out.data_ptr(), ldo=n,
        pre=pre.data_ptr() if pre is not None else 0, ldp=n, **launch_args(a.device),
    )
    return out, pre


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T, both any strides (float32)."""
    return gemm(a, pack(b, scratch=True), b.shape[0])[0]


def epilogue_backward(grad: torch.Tensor, pre: torch.Tensor | None, activation: str | None,
                      need_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad (M, N) -> (dz = grad * act'(pre) (grad itself without an activation), db = sum of dz
    over rows (N,) or None), in one pass over grad."""
    grad = grad.contiguous()
    m, n = grad.shape
    dz = _alloc.empty_like(grad) if activation is not None else grad
    db = _alloc.empty(n, dtype=torch.float32, device=grad.device) if need_bias else None
    if activation is None and db is None:
        return dz, None
    pre = pre.contiguous() if activation is not None else None
    module_for(grad.device).linear_epilogue_backward(
        grad=grad.data_ptr(), pre=pre.data_ptr() if pre is not None else 0,
        grad_pre=dz.data_ptr() if activation is not None else 0,
        grad_bias=db.data_ptr() if db is not None else 0, M=m, N=n,
        activation=ACTIVATION_TAGS[activation], **launch_args(grad.device),
    )
    return dz, db
