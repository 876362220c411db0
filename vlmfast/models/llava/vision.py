"""LLaVA's image path: the CLIP tower's hidden states of vision_feature_layer (the class token
dropped by the "default" strategy; several layers concatenated along the features when
vision_feature_layer is a list) -> the two-layer projector -> one text-width vector per image token.

Only the tower's layers up to the deepest feature layer run (LLaVA-1.5 reads the penultimate
layer: the last one, and the post-layernorm, are loaded and saved but never computed).
"""

import torch
from torch import nn

from vlmfast.models import _ops
from vlmfast.models.clip import CLIPVisionTransformer
from vlmfast.models.layers import activation
from vlmfast.models.llava.config import LlavaConfig


class VisionTower(nn.Module):
    """transformers' CLIPVisionModel: the tower under `vision_model` (its checkpoint names)."""

    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, device=device, dtype=dtype)


class Projector(nn.Module):
    """linear_1 -> activation -> linear_2 (transformers' LlavaMultiModalProjector)."""

    def __init__(self, config: LlavaConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=config.multimodal_projector_bias, device=device, dtype=dtype)
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision * config.num_feature_layers, text, **kw)
        self.linear_2 = nn.Linear(text, text, **kw)
        self.act = activation(config.projector_hidden_act)
        self.fused_act = _ops.FUSED_ACTIVATIONS.get(config.projector_hidden_act)

    def forward(self, x):
        if self.fused_act is not None:  # the activation in linear_1's GEMM epilogue
            return _ops.linear(_ops.linear(x, self.linear_1, self.fused_act), self.linear_2)
        return _ops.linear(self.act(_ops.linear(x, self.linear_1)), self.linear_2)


def select_features(hidden: list[torch.Tensor], strategy: str) -> torch.Tensor:
    """The tower's (N, 1 + P, D) hidden states of each feature layer -> (N, T, D * layers)."""
    if strategy == "default":
        hidden = [h[:, 1:] for h in hidden]
    return hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
