"""Contrastive loss modules holding the learnable temperature (and bias), on vlmfast.ops.

    loss_fn = ClipLoss()                              # logit_scale = log(1 / 0.07)
    loss = loss_fn(image_features, text_features)     # (B, D) each -> ()
    loss_fn = SigLipLoss()                            # logit_scale = log(10), logit_bias = -10
    loss = loss_fn(image_features, text_features, group=dist.group.WORLD)

The parameter is the log of the scale (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): the
ops get exp(logit_scale), clamped to `max_logit_scale` (100 for CLIP, as CLIP clamps it so
training stays stable; the clamp passes no gradient once reached).
"""

import math

import torch
from torch import nn

from vlmfast import ops


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (open_clip's ClipLoss) with a learnable log scale."""

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float | None = 100.0,
                 *, normalize: bool = True, device=None, dtype=None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((), init_logit_scale, device=device, dtype=dtype or torch.float32))
        self.max_logit_scale, self.normalize = max_logit_scale, normalize

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to max_logit_scale: the multiplier of the logits, ()."""
        scale = self.logit_scale.exp()
        return scale if self.max_logit_scale is None else scale.clamp(max=self.max_logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, *, group=None) -> torch.Tensor:
        """image_features, text_features: (B, D) -> loss (). `group`: see ops.infonce_loss."""
        return ops.infonce_loss(image_features, text_features, self.scale(), normalize=self.normalize, group=group)

    def extra_repr(self) -> str:
        return f"max_logit_scale={self.max_logit_scale}, normalize={self.normalize}"


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss) with a learnable log scale and bias."""

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 max_logit_scale: float | None = None, *, normalize: bool = True, device=None, dtype=None):
        super().__init__()
        dtype = dtype or torch.float32
        self.logit_scale = nn.Parameter(torch.full((), init_logit_scale, device=device, dtype=dtype))
        self.logit_bias = nn.Parameter(torch.full((), init_logit_bias, device=device, dtype=dtype))
        self.max_logit_scale, self.normalize = max_logit_scale, normalize

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to max_logit_scale when set, ()."""
        scale = self.logit_scale.exp()
        return scale if self.max_logit_scale is None else scale.clamp(max=self.max_logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, *, group=None) -> torch.Tensor:
        """image_features, text_features: (B, D) -> loss (). `group`: see ops.siglip_loss."""
        return ops.siglip_loss(image_features, text_features, self.scale(), self.logit_bias,
                               normalize=self.normalize, group=group)

    def extra_repr(self) -> str:
        return f"max_logit_scale={self.max_logit_scale}, normalize={self.normalize}"
