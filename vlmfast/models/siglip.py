"""SigLIP: a ViT without class token pooled by attention with a learned probe, a bidirectional
text tower pooled at its last position, sigmoid logits with a learned bias (HF SiglipModel)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmfast.models import _ops
from vlmfast.models.config import SigLIPConfig
from vlmfast.models.dual_encoder import DualEncoder
from vlmfast.models.layers import MLP, Encoder, init_weights
from vlmfast.models.text import TextTransformer
from vlmfast.models.vit import VisionEmbeddings


class ProbeAttention(nn.Module):
    """One learned query attending over all tokens. Parameters kept in torch.nn.MultiheadAttention's
    fused layout (in_proj_weight (3D, D) = [Wq; Wk; Wv]) so checkpoints load as they are.

    probe (B, 1, D), x (B, N, D) -> (B, 1, D).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size, device=device, dtype=dtype))
        self.out_proj = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)

    def forward(self, probe, x):
        B, N, D = x.shape
        H, E = self.num_heads, self.head_dim
        q = F.linear(probe, self.in_proj_weight[:D], self.in_proj_bias[:D])  # (B, 1, D)
        kv = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:])  # (B, N, 2D): one GEMM for k and v
        q = q.view(B, 1, H, E).transpose(1, 2)
        k, v = kv.view(B, N, 2, H, E).permute(2, 0, 3, 1, 4)
        out = _ops.attention(q, k, v)  # (B, H, 1, E)
        return self.out_proj(out.transpose(1, 2).reshape(B, 1, D))


class AttentionPoolingHead(nn.Module):
    """(B, N, D) -> (B, D): probe attention, then a residual MLP on the pooled token."""

    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size, **kw))
        self.attention = ProbeAttention(cfg.hidden_size, cfg.num_attention_heads, **kw)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)

    def forward(self, x):
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SigLIPVisionTransformer(nn.Module):
    """pixel_values -> pooled (B, D) through the attention-pooling head (or, without the head,
    the mean of the post-LayerNorm'd tokens)."""

    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embeddings = VisionEmbeddings(cfg, class_token=False, patch_bias=True, **kw)
        self.encoder = Encoder(cfg, **kw)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.head = AttentionPoolingHead(cfg, **kw) if cfg.vision_use_head else None

    def forward_tokens(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        """(B, N, D) post-LayerNorm'd tokens (HF's last_hidden_state)."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values, mean=mean, std=std)))

    def forward(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        x = self.forward_tokens(pixel_values, mean=mean, std=std)
        return self.head(x) if self.head is not None else x.mean(dim=1)


class SigLIP(DualEncoder):
    """transformers' SiglipModel: encode_image / encode_text -> (B, D) (unnormalised),
    forward -> (logits_per_image, logits_per_text) = scale * cos + bias."""

    config_class = SigLIPConfig

    def __init__(self, config: SigLIPConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        self.config = config = config or SigLIPConfig()
        kw = dict(device=device, dtype=dtype)
        self.vision_model = SigLIPVisionTransformer(config.vision_config, **kw)
        self.text_model = TextTransformer(config.text_config, causal=False, pooling="last", head=True, **kw)
        self.logit_scale = nn.Parameter(torch.empty(1, **kw))
        self.logit_bias = nn.Parameter(torch.empty(1, **kw))
        if not self.logit_scale.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        head = self.vision_model.head
        if head is not None:
            nn.init.normal_(head.probe, std=0.02)
            nn.init.xavier_uniform_(head.attention.in_proj_weight)
            nn.init.zeros_(head.attention.in_proj_bias)
        # big_vision's init: temperature 10, bias -10 (few positives among many negatives)
        nn.init.constant_(self.logit_scale, math.log(10.0))
        nn.init.constant_(self.logit_bias, -10.0)

    def encode_image(self, pixel_values, *, mean=None, std=None) -> torch.Tensor:
        return self.vision_model(pixel_values, mean=mean, std=std)

    def encode_text(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_model(input_ids, attention_mask)

    def logits(self, image_embeds, text_embeds):
        img, txt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        logits_per_text = txt @ img.T * self.logit_scale.exp() + self.logit_bias
        return logits_per_text.T, logits_per_text
