"""SmolVLM's vision tower: SigLIP blocks over tiles of variable size (NaViT-style positions).

A tile smaller than image_size is padded to the batch's largest tile; its valid patches get
position ids spread over the full image_size grid (bucketised fractional coordinates) so that a
small tile still sees the whole learned position table, and padded patches are masked out of
the attention as keys. Module names follow transformers (embeddings.patch_embedding,
embeddings.position_embedding, encoder.layers.N..., post_layernorm) so checkpoints load by name.
"""

import torch
from torch import nn

from vlmfast.models import tables
from vlmfast.models.layers import Encoder
from vlmfast.models.smolvlm import _ops
from vlmfast.models.smolvlm.config import SmolVLMVisionConfig


def bucketised_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position ids of the patches of variable-size tiles, as transformers' SmolVLMVisionEmbeddings.

    patch_mask: bool (N, h, w), True on the patches a tile covers (a top-left rectangle).
    Returns int64 (N, h * w): for a tile of rows x cols valid patches, patch (i, j) gets
    bucket(i / rows) * side + bucket(j / cols), buckets of width 1 / side; padded patches get 0.
    """
    n, h, w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    rows = patch_mask[:, :, 0].sum(dim=1)  # (N,) valid patch rows of each tile
    cols = patch_mask[:, 0, :].sum(dim=1)
    # float32 fractions, clamped below 1, exactly as transformers computes them (bucket edges
    # are sensitive to the rounding of i * (1 / rows))
    frac_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(n, h * w)
    return torch.where(patch_mask.reshape(n, h * w), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: SmolVLMVisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.patch_size, self.patches_per_side = cfg.patch_size, cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, device=device, dtype=dtype
        )
        self.position_embedding = tables.embedding(cfg.patches_per_side**2, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor, normalization=None) -> torch.Tensor:
        """pixel_values float (N, C, H, W) normalised, or uint8 (N, H, W, C) as decoded with
        normalization = (mean, std) applied inside the patch embedding (after the 1/255);
        patch_mask bool (N, H/p, W/p). Returns (N, H/p * W/p, D)."""
        conv = self.patch_embedding
        if pixel_values.dtype == torch.uint8:
            mean, std = normalization
            x = _ops.patch_embed(pixel_values, conv.weight, conv.bias, mean=mean, std=std)
        else:
            x = _ops.patch_embed(pixel_values.to(conv.weight.dtype), conv.weight, conv.bias)
        return x + self.position_embedding(bucketised_position_ids(patch_mask, self.patches_per_side))


class VisionTransformer(nn.Module):
    """(N, C, H, W) float tiles (or uint8 (N, H, W, C) + normalization) + bool (N, H/p, W/p)
    patch masks -> (N, H/p * W/p, D) features."""

    def __init__(self, cfg: SmolVLMVisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg, device=device, dtype=dtype)
        self.encoder = Encoder(cfg, device=device, dtype=dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor, normalization=None) -> torch.Tensor:
        x = self.embeddings(pixel_values, patch_mask, normalization)
        keys = patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        # a tile without padding needs no mask: the unmasked kernel path is the fast one
        mask = None if bool(keys.all()) else keys
        return self.post_layernorm(self.encoder(x, attn_mask=mask))


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """bool (N, H, W) pixel mask -> bool (N, H/p, W/p): a patch counts when any pixel of it does."""
    n, h, w = pixel_mask.shape
    blocks = pixel_mask.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.to(torch.bool).any(dim=4).any(dim=2)
