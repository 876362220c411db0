"""The one place where SmolVLM reaches the fused ops.

Each function calls the vlmfast op when the installed tree has it and the plain-torch
computation with the same meaning otherwise, so the model runs while an op is being written.
Patch embedding and bidirectional attention for the vision tower come from the shared
vlmfast/models/_ops.py; what only the decoder needs (GQA, causal + key-padding masks, rotary on
per-token position tables, RMSNorm) lives here.
"""

import torch
import torch.nn.functional as F

from vlmfast import _extension
from vlmfast import ops as _vops
from vlmfast.models import _ops as _shared

patch_embed = _shared.patch_embed
swiglu = _shared.swiglu


def _op(name: str):
    return getattr(_vops, name, None)


def attention(q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """q: (B, H, L, E); k, v: (B, Hkv, S, E) with H % Hkv == 0 (GQA). attn_mask: bool,
    broadcastable to (B, 1, L, S), True takes part. Returns (B, H, L, E)."""
    gqa = q.shape[1] != k.shape[1]
    fused = _op("scaled_dot_product_attention")
    if fused is not None:
        return fused(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, E), one row per token; cos, sin: (T, E/2) float32. Rotate-half pairs (Llama)."""
    return _vops.apply_rotary_emb(x, cos, sin, seq_dim=0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, rounded to x's dtype, then scaled (in that order,
    so that bf16 results round as transformers' do). x: (..., D), weight: (D,). A float32
    training step on the CPU runs it as one pass each way (csrc/cpu/rms_norm.cpp): the composite
    below and its autograd are a dozen passes over the activations per norm."""
    if _fused_rms_norm_applies(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _fused_rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager float32 CPU tensors of which a gradient is wanted, with the C++ extension built.
    Inference keeps the composite (the native decode step has its own norm)."""
    return (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling() and _extension.load("_C") is not None)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from vlmfast.native import rms_norm as native

        x, weight = x.contiguous(), weight.contiguous()
        out, rstd = native.forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        from vlmfast.native import rms_norm as native

        x, weight, rstd = ctx.saved_tensors
        dx, dw = native.backward(grad, x, weight, rstd)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def embedding(ids: torch.Tensor, table: torch.nn.Embedding, *, weight_used_once: bool = False) -> torch.Tensor:
    """table(ids); weight_used_once: an untied table (see vlmfast.ops.embedding)."""
    fused = _op("embedding")
    if fused is not None and weight_used_once and torch.is_grad_enabled():
        return fused(ids, table.weight, table.padding_idx, weight_used_once=True)
    return table(ids)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         weight_used_once: bool = False) -> torch.Tensor:
    """Mean cross entropy of hidden @ weight.T (float32 logits) against labels, -100 ignored,
    without the (N, V) logits in memory when the fused op exists. hidden (B, L, D), weight
    (V, D), labels int64 (B, L). weight_used_once: an untied head (see the op). Returns a
    float32 scalar."""
    fused = _op("linear_cross_entropy")
    if fused is not None:
        # gradients recomputed in the backward: the head's (V, D) weight gradient is then not held
        # from the forward's end to the backward's start, the peak of a checkpointed training step
        # (65 MiB less for SmolVLM2-256M; the extra logits GEMM is over the labelled rows only);
        # an untied head under AdamWInBackward is even updated slice by slice, its gradient never whole
        return fused(hidden, weight, labels, ignore_index=-100, grads_in_forward=False,
                     weight_used_once=weight_used_once)
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
