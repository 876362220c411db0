"""PatchEmbed: ViT's first layer from decoded images, normalisation included (timm-like).

    embed = PatchEmbed(patch_size=16, in_chans=3, embed_dim=768, mean=CLIP_MEAN, std=CLIP_STD)
    tokens = embed(images_uint8_bhwc)          # (B, 196, 768) for 224 x 224 images
    packed = embed.pack([img_a, img_b])        # images of different sizes -> PackedPatches

`weight` (D, C, p, p) and `bias` (D,) are the Conv2d parameters of timm's `patch_embed.proj` and
HF's `embeddings.patch_embedding`, so checkpoints map onto them directly; `mean` and `std` are
tuples of floats (they belong to the preprocessing config, not to checkpoints, and stay exact
whatever dtype the module is cast to).
"""

import math

import torch
from torch import nn

from vlmfast import ops


class PatchEmbed(nn.Module):
    """uint8 (B, H, W, C) or float (B, C, H, W) images -> (B, N, D) patch tokens.

    Arguments:
        patch_size: p; H and W of every input must be multiples of it.
        in_chans: C.
        embed_dim: D.
        bias: whether the projection has a bias.
        mean, std: per-channel normalisation (length C) applied after uint8's 1/255, or None
            for none.
        img_size: the training resolution (int or (H, W)), only to report `grid_size` and
            `num_patches`; any multiple of p is accepted at run time (dynamic resolution).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, *,
                 bias: bool = True, mean=None, std=None, img_size=None, device=None, dtype=None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("mean, std: pass both (per-channel normalisation) or neither")
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(embed_dim, in_chans, patch_size, patch_size, **factory))
        self.bias = nn.Parameter(torch.empty(embed_dim, **factory)) if bias else None
        # Plain tuples, not buffers: module.to(bfloat16) must not round the normalisation.
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size = size
            self.grid_size = (size[0] // patch_size, size[1] // patch_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        else:
            self.img_size = self.grid_size = self.num_patches = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv2d's default initialisation (kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_chans * self.patch_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, H, W, C) or float (B, C, H, W) -> (B, N, D), N in raster order."""
        return ops.patch_embed(images, self.weight, self.bias, mean=self.mean, std=self.std)

    def pack(self, images, *, order: str = "raster") -> "ops.PackedPatches":
        """A list of uint8 (H_i, W_i, C) or float (C, H_i, W_i) images of any sizes -> one packed
        batch (tokens (T, D), positions (T, 2), cu_seqlens, max_seqlen, grid_sizes)."""
        return ops.pack_images(images, self.weight, self.bias, self.mean, self.std, order=order)

    def extra_repr(self) -> str:
        normalise = ", normalised" if self.mean is not None else ""
        return (f"patch_size={self.patch_size}, in_chans={self.in_chans}, embed_dim={self.embed_dim}, "
                f"bias={self.bias is not None}{normalise}")
