"""Vision transformers: the patch/position embeddings shared by the CLIP and SigLIP towers, and
`ViT`, a timm-style image classifier (class token or mean pooling, forward_features/forward_head).
"""

import torch
from torch import nn

from vlmfast.models import _ops, tables
from vlmfast.models.config import ViTConfig, VisionConfig
from vlmfast.models.layers import EncoderLayer, init_weights


def check_pixels(pixel_values: torch.Tensor, cfg: VisionConfig) -> None:
    """pixel_values: float (B, C, H, W) or uint8 (B, H, W, C) at the configured size."""
    H, W = (cfg.grid[0] * cfg.patch_size, cfg.grid[1] * cfg.patch_size)
    C = cfg.num_channels
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values: expected a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dtype == torch.uint8:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (H, W, C):
            raise ValueError(f"pixel_values: expected uint8 (B, {H}, {W}, {C}), got {tuple(pixel_values.shape)}")
    elif not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values: expected a float or uint8 tensor, got {pixel_values.dtype}")
    elif pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (C, H, W):
        raise ValueError(f"pixel_values: expected (B, {C}, {H}, {W}), got {tuple(pixel_values.shape)}")


class VisionEmbeddings(nn.Module):
    """Patches (+ class token) + learned positions.

    pixel_values: float (B, C, H, W) already normalised, or uint8 (B, H, W, C) with mean/std
    (normalised inside the fused patch embedding). Returns (B, N (+1), D).
    """

    def __init__(self, cfg: VisionConfig, *, class_token: bool, patch_bias: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, p, stride=p, bias=patch_bias, **kw)
        self.class_embedding = nn.Parameter(torch.empty(D, **kw)) if class_token else None
        num_positions = cfg.grid[0] * cfg.grid[1] + int(class_token)
        self.position_embedding = tables.embedding(num_positions, D, **kw)

    def forward(self, pixel_values, mean=None, std=None):
        check_pixels(pixel_values, self.cfg)
        w = self.patch_embedding
        x = _ops.patch_embed(pixel_values, w.weight, w.bias, mean=mean, std=std)  # (B, N, D)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight.to(x.dtype)


class ViT(nn.Module):
    """Image classifier. forward(pixel_values (B, C, H, W)) -> logits (B, num_classes).

    forward_features -> (B, N (+1), D) normalised tokens; forward_head pools them (class token or
    mean over patches) and applies the linear head (pre_logits=True skips the head).
    """

    def __init__(self, cfg: ViTConfig | None = None, *, device=None, dtype=None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig(**overrides)
        self.cfg = cfg
        self.vision_cfg = VisionConfig(**cfg.vision_kwargs())
        kw = dict(device=device, dtype=dtype)
        self.embeddings = VisionEmbeddings(self.vision_cfg, class_token=cfg.class_token, patch_bias=True, **kw)
        self.blocks = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                         cfg.layer_norm_eps, **kw)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        if not any(p.is_meta for p in self.parameters()):
            init_weights(self)
            if self.embeddings.class_embedding is not None:
                nn.init.normal_(self.embeddings.class_embedding, std=1e-6)

    def forward_features(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        x = self.embeddings(pixel_values, mean=mean, std=std)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.cfg.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, int(self.cfg.class_token):].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values, mean=mean, std=std))
