"""The one place where the models reach the fused ops (vlmfast.ops).

The models call these functions, never torch's versions directly, so swapping a kernel in or out
of every model happens here only. Each keeps the calling convention the models use (bool masks
with True = takes part; logit_scale already exp'd).
"""

import torch

from vlmfast import ops as _vops
from vlmfast.ops import reference as _reference


def attention(q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, L, E) / (B, H, S, E); attn_mask bool (B or 1, 1, L or 1, S), True takes part.
    Returns (B, H, L, E)."""
    return _vops.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def patch_embed(images, weight, bias=None, mean=None, std=None) -> torch.Tensor:
    """images: uint8 (B, H, W, C) (scaled by 1/255, then normalised with mean/std) or float
    (B, C, H, W); weight (D, C, p, p). Returns (B, N, D) patches in raster order."""
    if images.is_floating_point() and images.dtype != weight.dtype:
        images = images.to(weight.dtype)
    return _vops.patch_embed(images, weight, bias, mean=mean, std=std)


# hidden_act names of the checkpoints -> the activation fused into the GEMM's epilogue.
FUSED_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_new": "gelu_tanh"}


def linear(x, layer: torch.nn.Linear, activation: str | None = None) -> torch.Tensor:
    """act(layer(x)): x (..., K) -> (..., N). activation: a value of FUSED_ACTIVATIONS or None.
    float32 CPU inputs run vlmfast's GEMM (bias and activation fused); the rest is torch's.
    A LoRA layer (vlmfast.train.lora) adds its low-rank term before the activation."""
    add_adapters = getattr(layer, "add_adapters", None)
    if add_adapters is None:
        return _vops.linear(x, layer.weight, layer.bias, activation=activation)
    z = add_adapters(x, _vops.linear(x, layer.weight, layer.bias))
    return z if activation is None else _reference.LINEAR_ACTIVATIONS[activation](z)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 I) = [gate | up] -> (..., I): the fused op (one pass
    each way, only gate_up kept for the backward) on the CPU, and on CUDA where a backward will
    run. CUDA inference keeps the composite: two of torch's kernel launches cost less than one
    Triton launch from Python at a decode step's size (and are what a CUDA graph captures)."""
    if gate_up.device.type == "cpu" or (torch.is_grad_enabled() and gate_up.requires_grad):
        return _vops.swiglu(gate_up)
    return _vops.reference.swiglu(gate_up)


def clip_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """open_clip's ClipLoss. Features (B, D) (normalised inside); logit_scale the multiplier,
    already exp'd (scalar tensor). The fused kernel never holds the B x B logits."""
    return _vops.infonce_loss(image_features, text_features, logit_scale)


def siglip_loss(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    """open_clip's SigLipLoss; logit_scale already exp'd; both scalar tensors."""
    return _vops.siglip_loss(image_features, text_features, logit_scale, logit_bias)
