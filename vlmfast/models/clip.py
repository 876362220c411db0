"""CLIP: a ViT image tower and a causal text tower projected into one space (HF CLIPModel)."""

import torch
import torch.nn.functional as F
from torch import nn

from vlmfast.models.config import CLIPConfig
from vlmfast.models.dual_encoder import DualEncoder
from vlmfast.models.layers import Encoder, init_weights
from vlmfast.models.text import TextTransformer
from vlmfast.models.vit import VisionEmbeddings


class CLIPVisionTransformer(nn.Module):
    """pixel_values -> pooled (B, D): class token after the encoder, post-LayerNorm'd."""

    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embeddings = VisionEmbeddings(cfg, class_token=True, patch_bias=False, **kw)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)  # HF's spelling
        self.encoder = Encoder(cfg, **kw)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def forward_tokens(self, pixel_values, mean=None, std=None, *, hidden_states=None) -> torch.Tensor:
        """(B, 1 + N, D) hidden states of the last layer (before post_layernorm). hidden_states:
        transformers' indices (e.g. (-2,), LLaVA's feature layer): a list of those layers'
        (B, 1 + N, D) outputs instead, the deeper layers not run (Encoder.forward)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values, mean=mean, std=std))
        return self.encoder(x, hidden_states=hidden_states)

    def forward(self, pixel_values, mean=None, std=None) -> torch.Tensor:
        return self.post_layernorm(self.forward_tokens(pixel_values, mean=mean, std=std)[:, 0])


class CLIP(DualEncoder):
    """Both towers, projections and the learnable log logit scale, as transformers' CLIPModel.

    encode_image(pixel_values (B, C, H, W) float, or uint8 (B, H, W, C) with mean/std) -> (B, P)
    encode_text(input_ids (B, L), attention_mask (B, L) or None) -> (B, P)
    forward(...) -> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))
    Embeddings are not normalised (as HF's get_*_features); the logits use normalised ones.
    """

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        self.config = config = config or CLIPConfig()
        kw = dict(device=device, dtype=dtype)
        self.vision_model = CLIPVisionTransformer(config.vision_config, **kw)
        self.text_model = TextTransformer(config.text_config, causal=True, pooling="eos", head=False, **kw)
        P = config.projection_dim
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, P, bias=False, **kw)
        self.text_projection = nn.Linear(config.text_config.hidden_size, P, bias=False, **kw)
        self.logit_scale = nn.Parameter(torch.empty((), **kw))
        if not self.logit_scale.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        emb = self.vision_model.embeddings
        nn.init.normal_(emb.class_embedding, std=emb.class_embedding.shape[0] ** -0.5)
        nn.init.constant_(self.logit_scale, self.config.logit_scale_init_value)

    # -------------------------------------------------------------------------- towers
    def encode_image(self, pixel_values, *, mean=None, std=None) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values, mean=mean, std=std))

    def encode_text(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def logits(self, image_embeds, text_embeds):
        """(logits_per_image, logits_per_text) from unnormalised embeddings (B_i, P), (B_t, P)."""
        img, txt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        logits_per_text = txt @ img.T * self.logit_scale.exp()
        return logits_per_text.T, logits_per_text
