"""attention_varlen: attention over packed sequences (no padding), each attending only to itself."""

import torch

from vlmfast.ops import _checks, _dispatch, _eager, reference
from vlmfast.ops.attention import backends, validation, varlen_op
from vlmfast.ops.attention.varlen_op import attention_varlen_fwd
from vlmfast.ops.rotary import apply_rotary_emb


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention over packed sequences, each attending only to itself (no padding).

    Arguments:
        q: (T, H, E), the tokens of n sequences one after another; float32/float16/bfloat16.
        k, v: (T, Hkv, E), H % Hkv == 0 (query head h reads kv head h // (H / Hkv)).
        cu_seqlens: int32 (n + 1,), cumulative lengths: 0, len0, len0 + len1, ..., T.
        max_seqlen: the longest sequence (sizes the kernel grid).
        is_causal: token i of a sequence attends its tokens j <= i.
        scale: the score multiplier; 1 / sqrt(E) when None.
        rotary: (cos, sin), each (T, R/2): one table row per packed token, applied to q and k.
    Returns:
        (T, H, E): equal to scaled_dot_product_attention on each sequence alone.
    """
    validation.qkv(q, k, v, "(T, H, E)", "(T, Hkv, E)", (3,), names=("q", "k", "v"))
    total, heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[-1] != head_dim:
        raise ValueError(f"k: expected (T, Hkv, E) = ({total}, Hkv, {head_dim}) like q, got {_checks.shape_of(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected (T, Hkv, E) = {tuple(k.shape)} like k, got {_checks.shape_of(v)}")
    validation.heads(q, k, True, "(T, Hkv, E)", head_dim_index=1, key_name="k")
    scale = validation.scale(scale, head_dim)
    validation.cu_seqlens(cu_seqlens, q, max_seqlen)
    # The value checks read cu_seqlens back: skipped under torch.compile and CUDA-graph capture.
    if not torch.compiler.is_compiling() and not (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        validation.cu_seqlens_values(cu_seqlens, total, max_seqlen)
    cos = sin = None
    if rotary is not None:
        validation.rotary(rotary, total, head_dim, q.device, "T")
        cos, sin = rotary
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            q, k = apply_rotary_emb(q, cos, sin, seq_dim=0), apply_rotary_emb(k, cos, sin, seq_dim=0)
            cos = sin = None
    if head_dim > backends.MAX_HEAD_DIM:
        _dispatch.record("attention_varlen", "reference")
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, is_causal, scale,
                                           None if cos is None else (cos, sin))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if _eager.plain_inference(q, k, v, cu_seqlens, cos, sin):
        return varlen_op.forward(q, k, v, cu_seqlens, max_seqlen, scale, bool(is_causal), cos, sin)[0]
    out, _ = attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, bool(is_causal), cos, sin)
    return out
