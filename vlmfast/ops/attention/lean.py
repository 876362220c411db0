"""The common eager call on the CPU (not compiling, plain 4-D tensors of one batch, no mask or a
bool / float one), in a few attribute reads: an inference call (a decode step: no gradient)
straight to the C++ launcher, a training call straight to dense_op's eager autograd path.

Why: the full path's validation, broadcasting, mask conversion, custom op and lse cost ~20 us a
call, twice torch's whole SDPA on a decode step over a short cache, and a fifth of a small
training call. Every condition below is one that the full path would accept and send to the
"cpp" backend with the same result; the launchers record the call as ("attention", "cpp") as
they do on the full path.
"""

import math

import torch

from vlmfast.ops import _dispatch
from vlmfast.ops.attention import backends, dense_op, masks

_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
_CPU = torch.device("cpu")


def cpu_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """The attention output, or None for any call this path does not take (the full path then
    runs it, and its checks raise the errors)."""
    # First: nothing below (data_ptr()) may be traced or see functorch's wrapped tensors.
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if not (
        type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
        and query.is_cpu and key.is_cpu and value.is_cpu
    ):
        return None
    training = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    dtype = query.dtype
    if dtype not in _DTYPES or key.dtype is not dtype or value.dtype is not dtype:
        return None
    q_shape, k_shape = query.shape, key.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or value.shape != k_shape:
        return None
    batch, heads, length, head_dim = q_shape
    kv_batch, kv_heads, keys, kv_dim = k_shape
    if (
        kv_batch != batch or kv_dim != head_dim or not 0 < head_dim <= backends.MAX_HEAD_DIM
        or not (batch and heads and length and keys and kv_heads)
        or (kv_heads != heads and not (enable_gqa and heads % kv_heads == 0))
    ):
        return None
    q_strides, k_strides, v_strides = query.stride(), key.stride(), value.stride()
    if q_strides[3] != 1 or k_strides[3] != 1 or v_strides[3] != 1:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif type(scale) is not float and type(scale) is not int:
        return None
    bias_ptr = mask_ptr = 0
    bias_strides = (0, 0, 0, 0)
    if attn_mask is not None:
        if type(attn_mask) is not torch.Tensor or not attn_mask.is_cpu:
            return None
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return None
        mask_dtype = attn_mask.dtype
        if mask_dtype is not torch.bool and mask_dtype is not torch.float32:
            return None  # other masks are converted (or refused) on the full path
        bias_strides = masks.broadcast_strides(attn_mask.shape, attn_mask.stride(), batch, heads, length, keys)
        if bias_strides is None:
            return None
        if mask_dtype is torch.bool:
            mask_ptr = attn_mask.data_ptr()
        else:
            bias_ptr = attn_mask.data_ptr()
    if _dispatch.select("attention", _CPU, dtype) != "cpp":
        return None
    if training:
        bias = None
        if attn_mask is not None:  # the kernels' float32 bias, (B, H, L, S) with stride-0 dims
            bias = attn_mask if mask_dtype is torch.float32 else torch.where(attn_mask, 0.0, float("-inf"))
            bias = bias.expand(batch, heads, length, keys)
        return dense_op.eager("cpp", query, key, value, bias, float(scale), bool(is_causal), None, None)
    return backends.native().forward_inference(
        query, key, value, (batch, heads, kv_heads, length, keys, head_dim),
        (q_strides[:3], k_strides[:3], v_strides[:3]), float(scale), bool(is_causal), bias_ptr,
        mask_ptr, bias_strides)
