"""The token embedding table and the LM head of a vision-language model's decoder, whose head may
be that table (tied: `lm_head` is None): the model's dtype and device (the table's), the head's
weight, and the head itself. SmolVLM, Qwen2-VL and CausalVLM (LLaVA, BLIP-2) share them."""

from __future__ import annotations

import torch
from torch import nn

from vlmfast.models.smolvlm import packing


class TokenTableHead:
    """Mixin for an nn.Module with an `lm_head` attribute (nn.Linear, or None when tied) and an
    `embed_tokens` property naming its token table."""

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, D): the lm_head's weight, the embedding matrix when the head is tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def _untied(self) -> bool:
        # the head and the embedding table are different tensors (each has one use in a forward)
        return self.head_weight is not self.embed_tokens.weight

    def _head_holder(self) -> nn.Module:
        # the module whose packed copy of the head weight is used (the tied head has no Linear)
        return self.lm_head if self.lm_head is not None else self.embed_tokens

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> logits (..., V)."""
        return packing.linear(hidden, self._head_holder(), self.head_weight)
