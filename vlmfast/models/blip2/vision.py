"""BLIP-2's vision tower (transformers' Blip2VisionModel): a pre-norm ViT whose fused qkv has one
(3D,) bias (q and v learnt, k initialised to zero), a class token, learned positions as one
(1, 1 + N, D) parameter and a post-layernorm over every token.

pixel_values: float (B, C, H, W) normalised, or uint8 (B, H, W, C) with mean / std (normalised
inside the fused patch embedding). Returns the post-layernormed (B, 1 + N, D).
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast.models import _ops
from vlmfast.models.blip2.config import Blip2VisionConfig
from vlmfast.models.layers import MLP
from vlmfast.ops import _checks


def check_pixels(pixel_values, cfg: Blip2VisionConfig) -> None:
    side = cfg.image_size
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values: expected a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dtype == torch.uint8:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (side, side, cfg.num_channels):
            raise ValueError(f"pixel_values: expected uint8 (B, {side}, {side}, {cfg.num_channels}), "
                             f"got {_checks.shape_of(pixel_values)}")
        return
    _checks.floating("pixel_values", pixel_values)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, side, side):
        raise ValueError(f"pixel_values: expected (B, {cfg.num_channels}, {side}, {side}), "
                         f"got {_checks.shape_of(pixel_values)}")


class Embeddings(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, D, **kw))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, p, stride=p, **kw)
        rows, cols = cfg.grid
        self.position_embedding = nn.Parameter(torch.empty(1, rows * cols + 1, D, **kw))

    def forward(self, pixel_values, mean=None, std=None):
        w = self.patch_embedding
        x = _ops.patch_embed(pixel_values, w.weight, w.bias, mean=mean, std=std)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class Attention(nn.Module):
    """Self-attention over the patches: one (D, 3D) GEMM, then the output `projection`."""

    def __init__(self, cfg: Blip2VisionConfig, *, device=None, dtype=None):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.qkv = nn.Linear(D, 3 * D, bias=cfg.qkv_bias, device=device, dtype=dtype)
        self.projection = nn.Linear(D, D, device=device, dtype=dtype)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = _ops.linear(x, self.qkv).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = _ops.attention(q, k, v)
        return _ops.linear(out.transpose(1, 2).reshape(B, L, D), self.projection)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.self_attn = Attention(cfg, **kw)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # layers.set_gradient_checkpointing turns it on

    def forward(self, x):
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if checkpointing else layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = cfg
        self.embeddings = Embeddings(cfg, **kw)
        self.encoder = Encoder(cfg, **kw)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def forward(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        """(B, 1 + N, D): every token after the post-layernorm (transformers' last_hidden_state)."""
        check_pixels(pixel_values, self.config)
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values, mean=mean, std=std)))
