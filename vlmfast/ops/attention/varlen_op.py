"""Packed-sequence attention as custom ops, `vlmfast::attention_varlen_fwd` / `_bwd` (fake impls
+ autograd). Triton has a varlen kernel, and C++ a varlen forward (every sequence in one call);
the rest (the C++ backward, the reference) attends each sequence alone through the dense
backend, handing it that sequence's rows of the rotary tables (row p of the piece is packed row
start + p), which the C++ kernel rotates as it packs q and k: no separate pass.

Shapes: q (T, H, E), k / v (T, Hkv, E), cu_seqlens int32 (n + 1,), tables (T, R/2) or None;
attention_varlen_fwd returns (out (T, H, E), lse float32 (H, T)).
"""

import torch

from vlmfast.ops import _dispatch
from vlmfast.ops.attention import backends
from vlmfast.ops.attention.dense_op import lse_dtype


def _sequences(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def _as_dense(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Packed rows [start, end) of (T, H, E) as (1, H, end - start, E), a view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _table_rows(cos, sin, start: int, end: int) -> tuple:
    """The rotary tables' rows [start, end) (views), or (None, None) without rotary."""
    if cos is None:
        return None, None
    return cos[start:end], sin[start:end]


@torch.library.custom_op("vlmfast::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float, is_causal: bool, cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, E), lse float32 (H, T)) for packed q (T, H, E), k/v (T, Hkv, E)."""
    return forward(q, k, v, cu_seqlens, max_seqlen, scale, is_causal, cos, sin)


def forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, is_causal: bool, cos, sin) -> tuple:
    """attention_varlen_fwd's body (also run directly by plain inference calls, ops/_eager.py)."""
    backend = _dispatch.select("attention", q.device, q.dtype)
    if backend == "triton":
        return backends.triton().forward_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale,
                                                is_causal=is_causal,
                                                rotary=None if cos is None else (cos, sin))
    if backend == "cpp":
        # every sequence in one kernel call, written in place: no launch, allocation and
        # copy-back per sequence (Qwen2.5-VL's window blocks have dozens of short ones)
        return backends.native().launch_varlen_forward(
            q, k, v, cu_seqlens, scale, is_causal, backends.float32_tables(cos, sin))
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q))
    for start, end in _sequences(cu_seqlens):
        piece_out, piece_lse = backends.forward(
            backend, *(_as_dense(t, start, end) for t in (q, k, v)), None, scale, is_causal,
            *_table_rows(cos, sin, start, end))
        out[start:end] = piece_out[0].transpose(0, 1)
        lse[:, start:end] = piece_lse[0]
    return out, lse


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q))


@torch.library.custom_op("vlmfast::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, is_causal: bool,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) packed like (q, k, v)."""
    backend = _dispatch.select("attention", q.device, q.dtype)
    if backend == "triton":
        return backends.triton().backward_varlen(grad, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                 scale=scale, is_causal=is_causal,
                                                 rotary=None if cos is None else (cos, sin))
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for start, end in _sequences(cu_seqlens):
        pieces = [_as_dense(t, start, end) for t in (grad, q, k, v, out)]
        piece_lse = lse[:, start:end].unsqueeze(0)
        # With tables, dq and dk come back through the inverse rotation already.
        grads = backends.backward(backend, *pieces, piece_lse, None, scale, is_causal,
                                  *_table_rows(cos, sin, start, end))
        for full, piece in zip((dq, dk, dv), grads):
            full[start:end] = piece[0].transpose(0, 1)
    return dq, dk, dv


@attention_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, is_causal, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cos, sin)
    ctx.options = (max_seqlen, scale, is_causal)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, cos, sin = ctx.saved_tensors
    max_seqlen, scale, is_causal = ctx.options
    dq, dk, dv = attention_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                      max_seqlen, scale, is_causal, cos, sin)
    return dq, dk, dv, None, None, None, None, None, None


attention_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
