"""scaled_dot_product_attention: a drop-in for torch's, plus rotary fused into the kernel.

The route of a call: the lean CPU path when it applies (lean.py); else validation
(validation.py, masks.py); torch's SDPA for what no kernel covers (torch_fallback.py); else the
dense op (dense_op.py) on 4-D views, the batch dims broadcast as torch broadcasts them.
"""

import math

import torch

from vlmfast.ops import _checks
from vlmfast.ops.attention import backends, dense_op, lean, masks, torch_fallback, validation
from vlmfast.ops.rotary import apply_rotary_emb


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fused attention, a drop-in for torch.nn.functional.scaled_dot_product_attention.

    Arguments:
        query: (B, H, L, E) (or (N, L, E), or (..., H, L, E)); float32, float16, bfloat16
            (float64 runs the reference). Any strides with the last dim contiguous are read in
            place (q, k, v sliced from one fused qkv projection need no copy).
        key, value: (B, Hkv, S, E), the dtype and device of query; Hkv = H unless enable_gqa,
            then H % Hkv == 0 and query head h reads kv head h // (H / Hkv). As in torch, the
            batch dims of query, key and value broadcast (query (H, L, E) with key (B, H, S, E)).
        attn_mask: None, bool (True takes part) or float (added to the scores), broadcastable to
            (B, H, L, S); a key-padding mask (B, 1, 1, S) is never expanded in memory.
        dropout_p: > 0 hands the call to torch (dropout is not fused).
        is_causal: query i attends keys j <= i (torch's top-left convention, also for L != S).
            Unlike torch, may be combined with attn_mask (both apply).
        scale: the score multiplier; 1 / sqrt(E) when None.
        enable_gqa: allow Hkv < H (grouped-query attention).
        rotary: (cos, sin), each (L, R/2), R <= E: apply_rotary_emb (non-interleaved) to query
            and key inside the kernel first. Requires L == S. Tables that require grad are
            applied outside the kernel so that they get their gradient.
    Returns:
        (B, H, L, E) in query's dtype (query's shape, batch dims broadcast). A row with no key
        to attend (all masked) is 0, with zero gradients, where torch may give NaN.
    """
    if rotary is None and not dropout_p:
        out = lean.cpu_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    validation.qkv(query, key, value, "(B, H, L, E)", "(B, Hkv, S, E)", range(3, 9))
    shapes = validation.broadcast_shapes(query, key, value, bool(enable_gqa))
    q_shape = query.shape if shapes is None else shapes[0]
    head_dim, length, keys = query.shape[-1], query.shape[-2], key.shape[-2]
    if key.shape[-1] != head_dim:
        raise ValueError(f"key: expected (B, Hkv, S, E) with E = {head_dim} like query, got {_checks.shape_of(key)}")
    if value.shape[-2] != keys:
        raise ValueError(
            f"value: expected (B, Hkv, S, Ev) with the (B, Hkv, S) of key {tuple(key.shape[:-1])}, "
            f"got {_checks.shape_of(value)}"
        )
    if shapes is None:
        validation.heads(query, key, bool(enable_gqa), "(B, Hkv, S, E)")
    scale = validation.scale(scale, head_dim)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {dropout_p!r}")
    target = (*q_shape[:-2], length, keys)
    if attn_mask is not None:
        bias_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        bias = masks.to_bias(attn_mask, target, query.device, bias_dtype)
    if rotary is not None:
        validation.rotary(rotary, length, head_dim, query.device, "L")
        if keys != length:
            raise ValueError(f"rotary: requires L == S (one table row per query and key), got L = {length}, S = {keys}")
        cos, sin = rotary
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            # Learnable tables: rotate outside the kernel so the tables get their gradient.
            query, key = apply_rotary_emb(query, cos, sin), apply_rotary_emb(key, cos, sin)
            rotary = None

    mask_needs_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    if dropout_p > 0 or value.shape[-1] != head_dim or head_dim > backends.MAX_HEAD_DIM or mask_needs_grad:
        return torch_fallback.attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                        enable_gqa, rotary)
    if shapes is not None:  # broadcast batch dims: stride-0 views, their gradients summed back
        query, key, value = query.expand(shapes[0]), key.expand(shapes[1]), value.expand(shapes[2])
    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    bias4 = None if attn_mask is None else masks.as_4d(bias, q4.shape[:2])
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary
    out = dense_op.attention(q4, k4, v4, bias4, scale, bool(is_causal), cos, sin)
    return out if out.dim() == query.dim() else out.view(query.shape)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(N, L, E) -> (1, N, L, E); (..., H, L, E) -> (prod(...), H, L, E); last dim stride 1."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    rank = t.dim()
    if rank == 4:  # the usual case: no reshape (a decode step feels every op)
        return t
    if rank == 3:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])
