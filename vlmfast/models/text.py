"""The text tower of CLIP (causal, pooled at the end token) and SigLIP (bidirectional, pooled at
the last position, then a linear head)."""

import torch
from torch import nn

from vlmfast.models import tables
from vlmfast.models.config import TextConfig
from vlmfast.models.layers import Encoder


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig, *, device=None, dtype=None):
        super().__init__()
        self.token_embedding = tables.embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.position_embedding = tables.embedding(cfg.max_position_embeddings, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids):
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


def check_text(input_ids, attention_mask, cfg: TextConfig) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an int64 or int32 tensor (B, L), got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= cfg.max_position_embeddings:
        raise ValueError(
            f"input_ids: expected (B, L) with 1 <= L <= {cfg.max_position_embeddings}, got {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask: expected {tuple(input_ids.shape)} like input_ids, got {tuple(attention_mask.shape)}"
        )


class TextTransformer(nn.Module):
    """input_ids (B, L), attention_mask (B, L) of 1/0 or None -> pooled (B, D) (or (B, P) with a head).

    pooling="eos": CLIP, the first position holding eos_token_id (the largest id when the config's
    eos_token_id is the legacy 2, as transformers does). pooling="last": SigLIP, position L-1.
    """

    def __init__(self, cfg: TextConfig, *, causal: bool, pooling: str, head: bool, device=None, dtype=None):
        super().__init__()
        self.cfg, self.causal, self.pooling = cfg, causal, pooling
        kw = dict(device=device, dtype=dtype)
        self.embeddings = TextEmbeddings(cfg, **kw)
        self.encoder = Encoder(cfg, **kw)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size or cfg.hidden_size, **kw) if head else None

    def _mask(self, attention_mask, L: int):
        """bool (B, 1, L, L) or (B, 1, 1, L); None when only causality (or nothing) applies."""
        if attention_mask is None:
            return None
        keys = attention_mask.bool()[:, None, None, :]
        if not self.causal:
            return keys
        causal = torch.ones(L, L, dtype=torch.bool, device=keys.device).tril()
        return causal & keys

    def forward_tokens(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L, D) final hidden states after the final LayerNorm."""
        check_text(input_ids, attention_mask, self.cfg)
        x = self.embeddings(input_ids)
        mask = self._mask(attention_mask, input_ids.shape[1])
        x = self.encoder(x, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.final_layer_norm(x)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        x = self.forward_tokens(input_ids, attention_mask)
        if self.pooling == "last":
            pooled = x[:, -1]
        else:
            if self.cfg.eos_token_id == 2:
                where = input_ids.to(torch.int32).argmax(dim=-1)
            else:
                where = (input_ids == self.cfg.eos_token_id).to(torch.int32).argmax(dim=-1)
            pooled = x[torch.arange(x.shape[0], device=x.device), where]
        return self.head(pooled) if self.head is not None else pooled
