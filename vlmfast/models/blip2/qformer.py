"""BLIP-2's Q-Former (transformers' Blip2QFormerModel, query-only path): num_query_tokens learnt
queries, LayerNorm'd, through BERT-style post-norm layers: self-attention over the queries, then
(every cross_attention_frequency layers, from layer 0) cross-attention from the queries to the
image features, then the feed-forward; each sub-block LayerNorm(x + dense(sub-block(x))).

Attention runs on vlmfast's fused kernel, the cross-attention with L (queries) != S (image
tokens). In a float16 model transformers keeps the Q-Former and the queries in float32 (its
_keep_in_fp32_modules; a bfloat16 model is bfloat16 throughout); so does vlmfast (model.py), the
image features cast to the Q-Former's dtype on the way in.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast.models import _ops
from vlmfast.models.blip2.config import Blip2QFormerConfig
from vlmfast.models.layers import activation


class MultiHeadAttention(nn.Module):
    """query / key / value projections (key and value from `context` when it is given)."""

    def __init__(self, cfg: Blip2QFormerConfig, *, cross: bool, device=None, dtype=None):
        super().__init__()
        D = cfg.hidden_size
        source = cfg.encoder_hidden_size if cross else D
        self.num_heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.query = nn.Linear(D, D, device=device, dtype=dtype)
        self.key = nn.Linear(source, D, device=device, dtype=dtype)
        self.value = nn.Linear(source, D, device=device, dtype=dtype)

    def forward(self, x, context=None):
        """x (B, L, D), context (B, S, D_src) or None -> (B, L, D)."""
        B, L, D = x.shape
        source = x if context is None else context
        S = source.shape[1]
        H, E = self.num_heads, self.head_dim
        q = _ops.linear(x, self.query).view(B, L, H, E).transpose(1, 2)
        k = _ops.linear(source, self.key).view(B, S, H, E).transpose(1, 2)
        v = _ops.linear(source, self.value).view(B, S, H, E).transpose(1, 2)
        return _ops.attention(q, k, v).transpose(1, 2).reshape(B, L, D)


class ResidualNorm(nn.Module):
    """BERT's SelfOutput / Output: LayerNorm(residual + dense(x)) (dropout is off in eval)."""

    def __init__(self, width: int, hidden: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.dense = nn.Linear(width, hidden, device=device, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps, device=device, dtype=dtype)  # the checkpoints' name

    def forward(self, x, residual):
        return self.LayerNorm(_ops.linear(x, self.dense) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, *, cross: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attention = MultiHeadAttention(cfg, cross=cross, **kw)
        self.output = ResidualNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def forward(self, x, context=None):
        return self.output(self.attention(x, context), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, *, device=None, dtype=None):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        self.act = activation(cfg.hidden_act)
        self.fused_act = _ops.FUSED_ACTIVATIONS.get(cfg.hidden_act)

    def forward(self, x):
        if self.fused_act is not None:
            return _ops.linear(x, self.dense, self.fused_act)
        return self.act(_ops.linear(x, self.dense))


class Layer(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, index: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attention = AttentionBlock(cfg, cross=False, **kw)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = AttentionBlock(cfg, cross=True, **kw)
        if cfg.use_qformer_text_input:  # the text path's feed-forward: loaded and saved, unused by queries
            self.intermediate = Intermediate(cfg, **kw)
            self.output = ResidualNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.intermediate_query = Intermediate(cfg, **kw)
        self.output_query = ResidualNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def forward(self, x, image_embeds):
        x = self.attention(x)
        if self.has_cross_attention:
            x = self.crossattention(x, image_embeds)
        return self.output_query(self.intermediate_query(x), x)


class _LayerStack(nn.Module):
    def __init__(self, cfg: Blip2QFormerConfig, *, device=None, dtype=None):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i, device=device, dtype=dtype) for i in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # layers.set_gradient_checkpointing turns it on

    def forward(self, x, image_embeds):
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layer:
            x = checkpoint(layer, x, image_embeds, use_reentrant=False) if checkpointing else layer(x, image_embeds)
        return x


class QFormer(nn.Module):
    """forward(query_embeds (B, Q, D), image_embeds (B, S, D_vision)) -> (B, Q, D) in the
    Q-Former's dtype."""

    def __init__(self, cfg: Blip2QFormerConfig, *, device=None, dtype=None):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)
        self.encoder = _LayerStack(cfg, device=device, dtype=dtype)

    def forward(self, query_embeds, image_embeds):
        dtype = self.layernorm.weight.dtype
        x = self.layernorm(query_embeds.to(dtype))
        return self.encoder(x, image_embeds.to(dtype))
