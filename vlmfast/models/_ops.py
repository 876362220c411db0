"""The one place where the models reach the fused ops.

Each function calls the vlmfast op when the installed tree has it, and otherwise the plain-torch
computation with the same meaning (so the models work while an op is still being written). The
models never call torch's versions directly: swapping an op in or out happens here only.
"""

import torch
import torch.nn.functional as F

from vlmfast import ops as _vops


def _op(name: str):
    return getattr(_vops, name, None)


def attention(q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, L, E) / (B, H, S, E); attn_mask bool (B or 1, 1, L, S), True takes part.
    Returns (B, H, L, E)."""
    fused = _op("scaled_dot_product_attention")
    if fused is not None:
        return fused(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def patch_embed(images, weight, bias=None, mean=None, std=None) -> torch.Tensor:
    """images: uint8 (B, H, W, C) (scaled by 1/255, then normalised with mean/std) or float
    (B, C, H, W); weight (D, C, p, p). Returns (B, N, D) patches in raster order."""
    fused = _op("patch_embed")
    if fused is not None:
        return fused(images, weight, bias, mean=mean, std=std)
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).to(weight.dtype) / 255.0
    else:
        x = images.to(weight.dtype)
    if mean is not None:
        shape = (1, -1, 1, 1)
        x = (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)) / torch.as_tensor(
            std, dtype=x.dtype, device=x.device
        ).view(shape)
    p = weight.shape[-1]
    return F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)


def clip_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """open_clip's ClipLoss. Features (B, D) (normalised here); logit_scale the multiplier, already
    exp'd (scalar tensor). Returns a scalar."""
    fused = _op("infonce_loss")
    if fused is not None:
        return fused(image_features, text_features, logit_scale)
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    """open_clip's SigLipLoss: -sum(logsigmoid(labels * (scale * n(i) @ n(t).T + bias))) / B with
    labels 2I - 1. logit_scale already exp'd; both scalar tensors."""
    fused = _op("siglip_loss")
    if fused is not None:
        return fused(image_features, text_features, logit_scale, logit_bias)
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale * img @ txt.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
