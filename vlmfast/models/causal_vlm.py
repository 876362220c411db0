"""What LLaVA and BLIP-2 share: a decoder-only language model whose prompt embeddings carry image
features written over the image tokens, with the logits, the loss and the generation protocol
(new_cache / prefill / decode_step, vlmfast.generation.generate) built on top.

A family subclasses CausalVLM and provides:
  decoder            a module (inputs_embeds (B, L, D), position_ids (B, L), attn_mask bool
                     broadcastable to (B, 1, L, S) or None, is_causal, cache, slot) -> the final
                     hidden states (B, L, D_head) (after the final norm / projection)
  embed_tokens       the decoder's nn.Embedding
  lm_head            an nn.Linear, or None when the head is tied to embed_tokens
  embed(input_ids, pixel_values) -> (B, L, D): token embeddings with the image features written in
  check_images(input_ids, pixel_values): ValueError / TypeError naming the argument
  forward_positions(attention_mask (B, L) bool or None, B, L) -> int (B, L): the positions
                     transformers' forward (no cache) gives the tokens
  cache_layout()     -> (num_layers, num_kv_heads, head_dim) of the decoder's attention
and config.text_config with eos_token_id / pad_token_id (generate's defaults).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmfast.models.last_rows import first_predicting_row
from vlmfast.models.layers import set_gradient_checkpointing
from vlmfast.models.prompt_checks import check_labels, check_prompt
from vlmfast.models.smolvlm import packing
from vlmfast.models.smolvlm.model import (
    causal_padding_mask, preferred_dtype, read_generation_defaults, with_generation_defaults,
)
from vlmfast.models.token_head import TokenTableHead
from vlmfast.models.weights_once import weights_held_once

__all__ = ["CausalVLM", "causal_padding_mask", "preferred_dtype", "read_generation_defaults", "write_image_features"]


# below this many rows (a decode step's batch) an inference Linear on the CPU runs decode_step's
# matrix-vector kernel (vlmfast.native.decode.gemv): it streams the weight at about twice the rate
# of torch's float32 GEMM at one to eight rows here; larger calls are GEMMs
GEMV_ROWS = 16


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, holder: nn.Module | None = None) -> bool:
    """Whether few_rows_linear would take the GEMV kernel for x (..., K) and weight (N, K)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() >= GEMV_ROWS * x.shape[-1]:
        return False
    if x.dtype != weight.dtype or weight.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return False
    if holder is not None and getattr(holder, "add_adapters", None) is not None:  # LoRA: its adapters too
        return False
    from vlmfast.native import decode as native_decode
    from vlmfast.ops import _dispatch

    if _dispatch.forced_backend() not in (None, "cpp") or native_decode.module() is None:
        return False
    return weight.is_contiguous() and (weight.dtype == torch.float32 or native_decode.has_avx512_bf16())


def few_rows_linear(x: torch.Tensor, holder: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x (..., K) @ weight (N, K)^T + bias: the GEMV kernel for a few rows in inference
    (gemv_applies), else smolvlm.packing.linear (oneDNN's packed weights or torch's linear)."""
    if gemv_applies(x, weight, holder) and (bias is None or (bias.dtype == weight.dtype and bias.is_contiguous())):
        from vlmfast.native import decode as native_decode

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = native_decode.gemv(rows, weight, bias, threads=torch.get_num_threads())
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return packing.linear(x, holder, weight, bias)


def write_image_features(embeds: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor | None,
                         *, token_id: int, per_image: int) -> torch.Tensor:
    """embeds (B, L, D) with the rows of features (n_images, per_image, D) written, in order, over
    the positions where is_image (B, L) is True (as transformers' masked_scatter). ValueError
    naming input_ids when the counts differ."""
    tokens = int(is_image.sum())
    images = 0 if features is None else features.shape[0]
    if tokens != images * per_image:
        raise ValueError(
            f"input_ids: expected {per_image} image tokens (id {token_id}) per image, i.e. {images * per_image} "
            f"for the {images} image(s) in pixel_values, got {tokens}"
        )
    if features is None:
        return embeds
    return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))


class CausalVLM(TokenTableHead, nn.Module):
    """Base class (see the module doc). Attributes every instance has: generation_defaults (eos /
    pad ids of the checkpoint's generation_config.json), auto_pack (generate packs bf16 CPU
    weights for oneDNN on first use)."""

    def __init__(self):
        super().__init__()
        self.generation_defaults = {}
        self.auto_pack = True
        # inference keeps no packed copy of the weights in vlmfast's GEMM (ops.linear caches one per
        # weight by default): the model's weights are resident once; True trades memory for a few %
        # of a prompt's time (models/weights_once.py)
        self.cache_packed_weights = False

    # ------------------------------------------------------------------ subclass hooks

    @property
    def decoder(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, input_ids, pixel_values=None) -> torch.Tensor:
        raise NotImplementedError

    def check_images(self, input_ids, pixel_values) -> None:
        raise NotImplementedError

    def forward_positions(self, attention_mask, B: int, L: int) -> torch.Tensor:
        raise NotImplementedError

    def cache_layout(self) -> tuple[int, int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ head (dtype, device: TokenTableHead)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> logits (..., V); a decode step's few rows through the GEMV kernel."""
        return few_rows_linear(hidden, self._head_holder(), self.head_weight)

    def set_gradient_checkpointing(self, enable: bool = True):
        """Recompute each layer of every stack (vision tower, Q-Former, decoder) in the backward
        instead of keeping its activations. Generation never checkpoints. Returns self."""
        return set_gradient_checkpointing(self, enable)

    def _packed_linears(self) -> list[nn.Module]:
        return [m for m in self.decoder.modules() if isinstance(m, nn.Linear)]

    # ------------------------------------------------------------------ validation

    def check_inputs(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None) -> None:
        """ValueError / TypeError naming the argument and the expected shape."""
        check_prompt(input_ids, attention_mask)
        if pixel_attention_mask is not None:
            raise ValueError(f"pixel_attention_mask: {type(self).__name__} takes none (whole images only)")
        self.check_images(input_ids, pixel_values)

    # ------------------------------------------------------------------ forward, loss

    @weights_held_once
    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None,
                      first_row: int = 0) -> torch.Tensor:
        """The decoder's output (B, L - first_row, D) before the head, no cache: rows
        [first_row, L) (the decoder's last layer computes no other row)."""
        self.check_inputs(input_ids, pixel_values, None, attention_mask)
        B, L = input_ids.shape
        embeds = self.embed(input_ids, pixel_values)
        mask, causal = None, True
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if valid is not None and not bool(valid.all()):
            mask, causal = causal_padding_mask(valid), False
        if position_ids is None:
            position_ids = self.forward_positions(valid, B, L)
        return self.decoder(embeds, position_ids, mask, causal, first_row=first_row)

    @weights_held_once
    def forward(self, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None) -> torch.Tensor:
        """Logits (B, L, V), equal to transformers' for the same inputs (padding positions aside)."""
        return self.head(self.hidden_states(input_ids, pixel_values, attention_mask, position_ids=position_ids))

    @weights_held_once
    def loss(self, input_ids, labels, pixel_values=None, attention_mask=None) -> torch.Tensor:
        """Mean next-token cross entropy: logits at i predict labels[i + 1]; -100 is ignored
        (transformers' ForCausalLMLoss, float32 logits), fused with the head so that the
        (B, L, V) logits are never held. labels: int (B, L). The rows before the first one that
        predicts a label skip the decoder's last layer (models/last_rows.py)."""
        check_labels(input_ids, labels)
        first = first_predicting_row(labels)
        hidden = self.hidden_states(input_ids, pixel_values, attention_mask, first_row=first)
        return self.next_token_loss(hidden, labels[:, first:])

    # ------------------------------------------------------------------ cached steps (generation)

    def new_cache(self, batch_size: int, max_len: int):
        from vlmfast.generation.cache import StaticKVCache

        layers, kv_heads, head_dim = self.cache_layout()
        return StaticKVCache(layers, batch_size, kv_heads, max_len, head_dim, device=self.device, dtype=self.dtype)

    @weights_held_once
    def prefill(self, input_ids, pixel_values, pixel_attention_mask, attention_mask, cache) -> tuple:
        """Runs the prompt into an empty `cache` (slots [0, L)). attention_mask bool (B, L).
        Returns (logits of the last slot (B, V) float32, positions of the last token (B,))."""
        L = input_ids.shape[1]
        embeds = self.embed(input_ids, pixel_values)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # transformers' generate rule
        cache.append_mask(attention_mask)
        padded = not bool(attention_mask.all())
        mask = causal_padding_mask(attention_mask) if padded else None
        # the last row's output alone is read: the last layer computes no other
        hidden = self.decoder(embeds, positions, mask, not padded, cache=cache, slot=0, first_row=L - 1)
        cache.advance(L)
        return self.head(hidden[:, -1]).float(), positions[:, -1].clone()

    @weights_held_once
    def decode_step(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        """One token per row into slot cache.length; tokens, positions int (B,). Returns logits
        (B, V) float32."""
        slot = cache.length
        cache.key_mask[:, slot] = True
        embeds = self.embed_tokens(tokens[:, None])
        mask = cache.attention_mask(slot + 1) if padded else None
        hidden = self.decoder(embeds, positions[:, None], mask, False, cache=cache, slot=slot)
        cache.advance(1)
        return self.head(hidden[:, 0]).float()

    def decode_step_static(self, tokens, positions, slot, cache) -> torch.Tensor:
        """decode_step with step-independent shapes (slot an int64 (1,) tensor; attention over all
        max_len slots under the key mask): the function a CUDA graph captures. The caller
        advances cache.length."""
        cache.key_mask.index_fill_(1, slot, True)
        embeds = self.embed_tokens(tokens[:, None])
        hidden = self.decoder(embeds, positions[:, None], cache.attention_mask(cache.max_len), False,
                              cache=cache, slot=slot)
        return self.head(hidden[:, 0]).float()

    @weights_held_once
    def generate(self, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None,
                 **options) -> torch.Tensor:
        """Batched generation with a static KV cache, rows left-padded. Returns int (B, L + new);
        greedy output equals transformers' generate(do_sample=False). eos_token_id None: the
        checkpoint's generation_config.json, else its decoder config. More options (top_k,
        pad_token_id, streamer, generator, cache, static_shapes): vlmfast.generation.generate."""
        from vlmfast.generation.generate import generate

        eos_token_id, options = with_generation_defaults(self.generation_defaults, eos_token_id, options)
        return generate(self, input_ids, pixel_values, None, attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                        **options)
