"""The token embedding table and the LM head of a vision-language model's decoder, whose head may
be that table (tied: `lm_head` is None): the model's dtype and device (the table's), the head's
weight, the head itself, and the packing of the decoder's and the head's weights for CPU
inference. SmolVLM, Qwen2-VL and CausalVLM (LLaVA, BLIP-2) share them."""

from __future__ import annotations

import torch
from torch import nn

from vlmfast.models.smolvlm import packing


class TokenTableHead:
    """Mixin for an nn.Module with an `lm_head` attribute (nn.Linear, or None when tied), an
    `embed_tokens` property naming its token table and `_packed_linears()`, the decoder's Linear
    layers pack_weights packs."""

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    def _packed_linears(self) -> list[nn.Module]:
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

    def pack_weights(self) -> bool:
        """Packs the decoder's and the head's weights for CPU inference (oneDNN layout, about 2x
        faster GEMV in a decode step; see smolvlm/packing.py). Costs one more copy of those
        weights; gradients-on calls and weights changed later use the plain path. Returns whether
        it packed (CPU with oneDNN for this dtype)."""
        if self.device.type != "cpu" or not packing.available(self.dtype):
            return False
        for m in self._packed_linears():
            packing.pack(m)
        packing.pack(self._head_holder(), self.head_weight)
        return True

    def unpack_weights(self) -> None:
        for m in self.modules():
            packing.unpack(m)
