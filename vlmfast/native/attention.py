"""Launchers of the fused attention kernels in csrc/cpu/attention.cpp (the op layer's "cpp" backend).

Shapes (flash-attention style): q (B, H, L, E); k, v (B, Hkv, S, E) with H % Hkv == 0 (query head
h reads kv head h // (H // Hkv)); bias None or float32 broadcast with expand() to (B, H, L, S)
(stride-0 dims cost nothing; -inf masks a key); out (B, H, L, E) in q's dtype; lse (B, H, L)
float32, natural log. A row with no key to attend gives out = 0, lse = -inf and zero gradients.
"""

import torch

from vlmfast.native._common import DTYPE_TAGS, dtype_tag, launch_args, module_for
from vlmfast.ops import _alloc

# Backward work split (csrc/cpu/attention.h: AttentionBackwardStrategy).
STRATEGIES = {"auto": 0, "fused": 1, "two_pass": 2}


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read the head dim as contiguous floats; any other strides are fine."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check(q, k, v, bias) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v: expected (B, H, L, E) and (B, Hkv, S, E), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, length, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k, v: expected ({batch}, Hkv, S, {dim}) both, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[1] < 1 or heads % k.shape[1]:
        raise ValueError(f"k: expected a head count dividing {heads}, got {k.shape[1]}")
    if q.dtype not in DTYPE_TAGS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v: expected one of float32, float16, bfloat16, all alike, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if bias is not None:
        expected = (batch, heads, length, k.shape[2])
        if tuple(bias.shape) != expected or bias.dtype != torch.float32:
            raise ValueError(
                f"bias: expected float32 {expected} (expand() a broadcast mask), got "
                f"{bias.dtype} {tuple(bias.shape)}"
            )


def _bias_args(bias) -> dict:
    if bias is None:
        return {"bias": 0, "bias_strides": (0, 0, 0, 0)}
    return {"bias": bias.data_ptr(), "bias_strides": bias.stride()}


def _sizes(q, k) -> tuple:
    batch, heads, length, dim = q.shape
    return (batch, heads, k.shape[1], length, k.shape[2], dim)


def forward(q, k, v, *, scale: float, is_causal: bool, bias=None):
    """(out, lse): out (B, H, L, E) in q's dtype, contiguous; lse (B, H, L) float32."""
    _check(q, k, v, bias)
    q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
    out = _alloc.empty_like(q)
    lse = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    module_for(q.device).attention_forward(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        sizes=_sizes(q, k), q_strides=q.stride()[:3], k_strides=k.stride()[:3],
        v_strides=v.stride()[:3], out_strides=out.stride()[:3], scale=float(scale),
        is_causal=bool(is_causal), dtype=dtype_tag(q), **_bias_args(bias), **launch_args(q.device),
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, *, scale: float, is_causal: bool, bias=None):
    """(dq, dk, dv): dq (B, H, L, E) like q; dk, dv (B, Hkv, S, E) like k, v (summed over the
    query heads of each group). Recomputes the probabilities from q, k and lse."""
    return _backward(grad_out, q, k, v, out, lse, scale=scale, is_causal=is_causal, bias=bias)


def _backward(grad_out, q, k, v, out, lse, *, scale, is_causal, bias, strategy: str = "auto"):
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
    grad_out = _head_dim_contiguous(grad_out.to(q.dtype))
    out = out.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    dq = _alloc.empty_like(q)
    dk = _alloc.empty_like(k)
    dv = _alloc.empty_like(v)
    module_for(q.device).attention_backward(
        grad_out=grad_out.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
        out=out.data_ptr(), lse=lse.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(),
        dv=dv.data_ptr(), sizes=_sizes(q, k), grad_out_strides=grad_out.stride()[:3],
        q_strides=q.stride()[:3], k_strides=k.stride()[:3], v_strides=v.stride()[:3],
        out_strides=out.stride()[:3], dq_strides=dq.stride()[:3], dk_strides=dk.stride()[:3],
        dv_strides=dv.stride()[:3], scale=float(scale), is_causal=bool(is_causal),
        dtype=dtype_tag(q), strategy=STRATEGIES[strategy], **_bias_args(bias),
        **launch_args(q.device),
    )
    return dq, dk, dv
