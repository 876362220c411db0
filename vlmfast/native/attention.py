"""Launchers of the fused attention kernels in csrc/cpu/attention.cpp (the op layer's "cpp" backend).

Shapes (flash-attention style): q (B, H, L, E); k, v (B, Hkv, S, E) with H % Hkv == 0 (query head
h reads kv head h // (H // Hkv)); bias None or float32 broadcast with expand() to (B, H, L, S)
(stride-0 dims cost nothing; -inf masks a key); out (B, H, L, E) in q's dtype; lse (B, H, L)
float32, natural log. A row with no key to attend gives out = 0, lse = -inf and zero gradients.
"""

import torch

from vlmfast import _extension
from vlmfast.native._common import DTYPE_TAGS
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record

# Backward work split (csrc/cpu/attention.h: AttentionBackwardStrategy).
STRATEGIES = {"auto": 0, "fused": 1, "two_pass": 2}
# Below this many forward multiply-adds (B H L S E) the backward runs on one thread: a second
# one costs more than it saves there (best of 9, 2 cores: (2, 2, 33, 64) 44 us on one thread,
# 47 on two; (2, 4, 33, 64) 72 / 76; (2, 4, 64, 64) 152 / 96), and on a busy machine it waits
# for a core. The forward's kernel makes the same choice itself (below 2^18).
ONE_THREAD_BACKWARD_WORK = 1 << 20


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read the head dim as contiguous floats; any other strides are fine."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check(q, k, v, bias) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v: expected (B, H, L, E) and (B, Hkv, S, E) twice, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, length, dim = q.shape
    kv_batch, kv_heads, keys, kv_dim = k.shape
    if kv_batch != batch or kv_dim != dim:
        raise ValueError(f"k, v: expected ({batch}, Hkv, S, {dim}), got {tuple(k.shape)}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k: expected a head count dividing {heads}, got {kv_heads}")
    dtype = q.dtype
    if dtype not in DTYPE_TAGS or k.dtype != dtype or v.dtype != dtype:
        raise TypeError(
            f"q, k, v: expected one of float32, float16, bfloat16, all alike, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        raise ValueError(f"q, k, v: expected CPU tensors, got {q.device}, {k.device}, {v.device}")
    if bias is not None:
        expected = (batch, heads, length, keys)
        if bias.shape != expected or bias.dtype != torch.float32 or bias.device.type != "cpu":
            raise ValueError(
                f"bias: expected float32 {expected} on the CPU (expand() a broadcast mask), got "
                f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
            )


def _bias_args(bias) -> tuple:
    """(address, strides) of the bias; address 0 for none."""
    if bias is None:
        return 0, (0, 0, 0, 0)
    return bias.data_ptr(), bias.stride()


def _module():
    """vlmfast._C: these kernels run on CPU tensors only (the dispatcher checked it was built)."""
    return _extension.load("_C")


def forward(q, k, v, *, scale: float, is_causal: bool, bias=None, rotary=None):
    """(out, lse): out (B, H, L, E) in q's dtype, contiguous; lse (B, H, L) float32.

    rotary: None, or float32 (cos, sin) tables, each (P, R/2) with P >= max(L, S) and
    R <= E, row p for position p: q and k are rotated (non-interleaved, as
    vlmfast.ops.apply_rotary_emb, and rounded to their dtype as its output is) inside the kernel
    as they are packed, with no extra pass."""
    _check(q, k, v, bias)
    q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
    return launch_forward(q, k, v, bias, float(scale), bool(is_causal), rotary)


def launch_forward(q, k, v, bias, scale: float, is_causal: bool, rotary):
    """forward for arguments its checks would accept, as the op layer passes them (validated,
    head dim contiguous, bias float32 expanded to (B, H, L, S)): no second round of checks,
    the sizes and strides read once. A small call's backward and forward feel each microsecond."""
    record("attention", "cpp")
    batch, heads, length, dim = q.shape
    _, kv_heads, keys, _ = k.shape
    # Sizes as separate ints: torch.empty parses them faster than a torch.Size.
    out = _alloc.empty(batch, heads, length, dim, dtype=q.dtype, device=_CPU)
    lse = _alloc.empty(batch, heads, length, dtype=torch.float32, device=_CPU)
    bias_ptr, bias_strides = _bias_args(bias)
    tables = _rotary_tables(rotary, max(q.shape[2], k.shape[2]), q.shape[3])
    # Positional arguments: a decode step is short enough for keyword parsing to show.
    _module().attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), bias_ptr, out.data_ptr(), lse.data_ptr(),
        (batch, heads, kv_heads, length, keys, dim), q.stride()[:3], k.stride()[:3],
        v.stride()[:3], bias_strides, (heads * length * dim, length * dim, dim), scale, is_causal,
        DTYPE_TAGS[q.dtype], torch.get_num_threads(), *_rotary_args(tables),
    )
    return out, lse


def launch_varlen_forward(q, k, v, cu_seqlens, scale: float, is_causal: bool, rotary):
    """(out (T, H, E) contiguous, lse float32 (H, T)) for packed q (T, H, E), k / v (T, Hkv, E)
    with a contiguous head dim (any token and head strides: q, k, v may be views of one qkv
    GEMM output), cu_seqlens int32 (n + 1,) on the CPU, as the op layer has validated them. All
    sequences in one kernel call, one parallel loop over every sequence's (head, row block) jobs;
    rotary float32 (cos, sin) tables (T, R/2), row p for packed token p, or None."""
    record("attention_varlen", "cpp")
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    out = _alloc.empty(total, heads, dim, dtype=q.dtype, device=_CPU)
    lse = _alloc.empty(heads, total, dtype=torch.float32, device=_CPU)
    if cu_seqlens.dtype is not torch.int32 or not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    tables = _rotary_tables(rotary, total, dim)
    _module().attention_varlen_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), cu_seqlens.data_ptr(),
        cu_seqlens.shape[0] - 1, (total, heads, kv_heads, dim), q.stride()[:2], k.stride()[:2],
        v.stride()[:2], (heads * dim, dim), scale, is_causal, DTYPE_TAGS[q.dtype],
        torch.get_num_threads(), *_rotary_args(tables),
    )
    return out, lse


def forward_inference(q, k, v, sizes, strides, scale: float, is_causal: bool, bias_ptr: int,
                      mask_ptr: int, bias_strides) -> torch.Tensor:
    """out (B, H, L, E) only, no lse: the lean launch of an eager inference call (a decode step),
    for inputs the caller has already checked as forward's _check would accept them.

    sizes = (B, H, Hkv, L, S, E); q, k, v with a contiguous head dim, strides = the element
    strides of their first three dims (as the caller read them); bias_ptr: a float32
    additive bias, or mask_ptr: a bool mask (True takes part), either read through bias_strides
    (4 element strides over (B, H, L, S), 0 where broadcast), 0 for none. The caller keeps the
    bias or mask tensor alive across the call."""
    record("attention", "cpp")
    _, heads, length, dim = q.shape
    out = _alloc.empty_like(q)  # contiguous: strides known
    q_strides, k_strides, v_strides = strides
    # Positional arguments, no lse (nullptr): keyword parsing and an extra allocation show in a
    # decode step of a few microseconds.
    _module().attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), bias_ptr, out.data_ptr(), 0, sizes,
        q_strides, k_strides, v_strides, bias_strides, (heads * length * dim, length * dim, dim),
        scale, is_causal, DTYPE_TAGS[q.dtype], torch.get_num_threads(), 0, 0, 0, 0, mask_ptr,
    )
    return out


_CPU = torch.device("cpu")


def _rotary_tables(rotary, positions: int, dim: int):
    """The checked (cos, sin) float32 tables with contiguous rows and one row stride, or None,
    for `positions` rows of head dim `dim`. The caller keeps them alive while the kernel runs
    (they may be copies)."""
    if rotary is None:
        return None
    cos, sin = rotary
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape != cos.shape or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(
                f"rotary {name}: expected float32 (P, R/2) on the CPU, the same shape for cos and "
                f"sin, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if cos.shape[0] < positions or not 1 <= cos.shape[1] <= dim // 2:
        raise ValueError(
            f"rotary: expected tables (P, R/2) with P >= max(L, S) = {positions} and "
            f"1 <= R/2 <= E/2 = {dim // 2}, got {tuple(cos.shape)}"
        )
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the kernel takes one row stride
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _rotary_args(tables) -> tuple:
    """(cos address, sin address, R/2, row stride) of checked tables; zeros for none."""
    if tables is None:
        return (0, 0, 0, 0)
    cos, sin = tables
    return cos.data_ptr(), sin.data_ptr(), cos.shape[1], cos.stride(0)


def backward(grad_out, q, k, v, out, lse, *, scale: float, is_causal: bool, bias=None,
             rotary=None):
    """(dq, dk, dv): dq (B, H, L, E) like q; dk, dv (B, Hkv, S, E) like k, v (summed over the
    query heads of each group). Recomputes the probabilities from q, k and lse. With rotary
    (the tables the forward got), q and k are the unrotated inputs and dq, dk their gradients."""
    return _backward(grad_out, q, k, v, out, lse, scale=scale, is_causal=is_causal, bias=bias,
                     rotary=rotary)


def _backward(grad_out, q, k, v, out, lse, *, scale, is_causal, bias, strategy: str = "auto",
              rotary=None):
    """backward with the work split forced (tests run both: "fused", "two_pass")."""
    _check(q, k, v, bias)
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"grad_out, out: expected {tuple(q.shape)} like q, got {tuple(grad_out.shape)}, "
            f"{tuple(out.shape)}"
        )
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse: expected {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    q, k, v, out = (_head_dim_contiguous(t) for t in (q, k, v, out))
    grad_out = _head_dim_contiguous(grad_out)
    return launch_backward(grad_out, q, k, v, out, lse, bias, float(scale), bool(is_causal),
                           rotary, STRATEGIES[strategy])


def launch_backward(grad_out, q, k, v, out, lse, bias, scale: float, is_causal: bool, rotary,
                    strategy: int = 0):
    """backward for arguments its checks would accept, as the op layer passes them (see
    launch_forward); grad_out and out of any float dtype with a contiguous head dim, lse any
    layout (a varlen piece's is a strided view)."""
    record("attention_bwd", "cpp")
    dtype = q.dtype
    if grad_out.dtype is not dtype:
        grad_out = grad_out.to(dtype)
    if out.dtype is not dtype:
        out = out.to(dtype)
    if lse.dtype is not torch.float32 or not lse.is_contiguous():
        lse = lse.to(torch.float32).contiguous()
    batch, heads, length, dim = q.shape
    _, kv_heads, keys, _ = k.shape
    dq = _alloc.empty(batch, heads, length, dim, dtype=dtype, device=_CPU)
    dk = _alloc.empty(batch, kv_heads, keys, dim, dtype=dtype, device=_CPU)
    dv = _alloc.empty(batch, kv_heads, keys, dim, dtype=dtype, device=_CPU)
    work = batch * heads * length * keys * dim
    threads = 1 if work < ONE_THREAD_BACKWARD_WORK else torch.get_num_threads()
    q_grad_strides = (heads * length * dim, length * dim, dim)
    kv_grad_strides = (kv_heads * keys * dim, keys * dim, dim)
    bias_ptr, bias_strides = _bias_args(bias)
    tables = _rotary_tables(rotary, max(q.shape[2], k.shape[2]), q.shape[3])
    # Positional arguments (the binding's order): parsing ~30 keywords costs several
    # microseconds, which a small call's backward feels.
    _module().attention_backward(
        grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        lse.data_ptr(), bias_ptr, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        (batch, heads, kv_heads, length, keys, dim), grad_out.stride()[:3], q.stride()[:3],
        k.stride()[:3], v.stride()[:3], out.stride()[:3], bias_strides, q_grad_strides,
        kv_grad_strides, kv_grad_strides, scale, is_causal, DTYPE_TAGS[dtype], threads, strategy,
        *_rotary_args(tables),
    )
    return dq, dk, dv
