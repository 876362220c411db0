"""The token embedding table and the LM head of a vision-language model's decoder, whose head may
be that table (tied: `lm_head` is None): the model's dtype and device (the table's), the head's
weight, the head itself, the next-token loss through it, and the packing of the decoder's and
the head's weights for CPU inference. SmolVLM, Qwen2-VL and CausalVLM (LLaVA, BLIP-2) share them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmfast import ops as vops
from vlmfast.models.smolvlm import _ops, packing
from vlmfast.ops import weight_updates

# labelled rows x vocabulary up to which the loss materialises the logits (8 Mi floats: 32 MiB, e.g.
# 250 rows of a 32k vocabulary, 170 of SmolVLM2's 49k); above, the fused linear + cross-entropy
# never holds them
MATERIALISED_LOGITS = 8 * 2**20


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

    def next_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy of the head over hidden (B, L, D): logits at i predict
        labels[i + 1]; -100 is ignored (transformers' ForCausalLMLoss, float32 logits), fused
        with the head so that the (B, L, V) logits are never held. labels: int (B, L)."""
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(device=hidden.device, dtype=torch.long)
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        labelled = None
        if not torch.compiler.is_compiling():
            # only the labelled positions reach the head: the prompt and image tokens of a chat
            # batch are most of it, and their (V,)-wide logits would be computed for nothing
            keep = targets != -100
            labelled = int(keep.sum())  # one read of the count (a sync on a GPU)
            if 0 < labelled < keep.numel():
                hidden, targets = hidden[keep], targets[keep]
        weight = self.head_weight
        if torch.is_autocast_enabled(hidden.device.type):
            # autocast runs transformers' lm_head GEMM in its low precision (the loss in float32):
            # the fused head likewise, instead of float32 GEMMs at several times the cost
            low = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(low), weight.to(low)
        # MATERIALISED_LOGITS read at each call (0: always the fused op)
        few_rows = labelled and hidden.shape[0] * weight.shape[0] <= MATERIALISED_LOGITS
        if few_rows and not weight_updates.sliced(self.head_weight, self._untied):
            # a few labelled rows (a caption, a short answer): their logits are small, and one GEMM
            # + torch's cross entropy measured 2-3x faster than the fused op's vocabulary sweeps
            # (SmolVLM2's fine-tuning step, 60 labelled rows: 6-9 % of the step). Not when an
            # optimizer takes the head's gradient in slices: the fused op's backward never makes
            # the (V, D) gradient whole, the memory that setting is for
            logits = vops.linear(hidden, weight).float()
            return F.cross_entropy(logits, targets, ignore_index=-100)
        return _ops.linear_cross_entropy(hidden, weight, targets, weight_used_once=self._untied)

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
