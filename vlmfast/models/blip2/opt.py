"""The OPT decoder (transformers' OPTDecoder): token embeddings + learned positions (row p + 2: OPT
keeps two rows before position 0), layers of self-attention and a ReLU MLP, each either pre-norm
(do_layer_norm_before, OPT-125m, -1.3b, -2.7b, -6.7b...) or post-norm (OPT-350m), and a final
LayerNorm in the pre-norm layout.

One fusion against transformers' layout: self_attn.qkv = [q_proj; k_proj; v_proj] (one GEMM;
checkpoint.py maps the keys). The queries are scaled by 1/sqrt(E) after their projection and
attention runs with scale 1, in transformers' order (same rounding). With a KV cache, keys and
values of the new tokens are written into slots [slot, slot + L) (see smolvlm/decoder.py).
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast import ops
from vlmfast.generation.cache import write_kv
from vlmfast.models import _ops as shared_ops
from vlmfast.models import tables
from vlmfast.models.blip2.config import OPTConfig
from vlmfast.models.layers import activation
from vlmfast.models.causal_vlm import few_rows_linear
from vlmfast.models.last_rows import rows_mask

POSITION_OFFSET = 2


def _linear(x, layer: nn.Linear):
    if torch.is_grad_enabled():
        # training, the decoder frozen or not: vlmfast.ops.linear forward and backward (it picks the
        # faster GEMM per shape; a LoRA layer adds its adapters), never a cached packed copy
        return shared_ops.linear(x, layer)
    # inference: a decode step's few rows through decode_step's GEMV kernel; torch's GEMM, or
    # oneDNN's packed weights once pack_weights ran (bf16), for a prompt
    return few_rows_linear(x, layer, layer.weight, layer.bias)


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig, *, device=None, dtype=None):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        self.qkv = nn.Linear(D, 3 * D, bias=cfg.enable_bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(D, D, bias=cfg.enable_bias, device=device, dtype=dtype)

    def forward(self, x, attn_mask=None, is_causal=False, kv=None, slot=0, first_row: int = 0):
        """x (B, L, D); attn_mask bool broadcastable to (B, 1, L, S) or None; kv: (k, v) cache
        buffers (B, H, max_len, E) or None; slot: first slot written (int), or an int64 (L,)
        tensor (static shapes: attention reads all max_len slots). first_row: the output of rows
        [first_row, L) alone (vlmfast/models/last_rows.py). Returns (B, L - first_row, D)."""
        B, L, D = x.shape
        H, E = self.num_heads, self.head_dim
        qkv = _linear(x, self.qkv).view(B, L, 3, H, E)
        q = (qkv[:, first_row:, 0] * self.scaling).transpose(1, 2)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if kv is not None:
            k, v = write_kv(kv, k, v, slot)
        if first_row:
            attn_mask, is_causal = rows_mask(attn_mask, is_causal, first_row, L, k.shape[2], x.device)
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
        return _linear(out.transpose(1, 2).reshape(B, L - first_row, D), self.out_proj)


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = cfg.hidden_size
        affine = cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, **kw)
        self.self_attn_layer_norm = nn.LayerNorm(D, elementwise_affine=affine, **kw)
        self.fc1 = nn.Linear(D, cfg.ffn_dim, bias=cfg.enable_bias, **kw)
        self.fc2 = nn.Linear(cfg.ffn_dim, D, bias=cfg.enable_bias, **kw)
        self.final_layer_norm = nn.LayerNorm(D, elementwise_affine=affine, **kw)
        self.act = activation(cfg.activation_function)

    def forward(self, x, attn_mask=None, is_causal=False, kv=None, slot=0, first_row: int = 0):
        """(B, L, D) -> (B, L - first_row, D): rows [first_row, L) of the layer's output."""
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x[:, first_row:] + self.self_attn(h, attn_mask, is_causal, kv, slot, first_row)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + _linear(self.act(_linear(h, self.fc1)), self.fc2)
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    """transformers' OPTDecoder names: embed_tokens, embed_positions, layers, final_layer_norm.
    (word_embed_proj_dim != hidden_size, with project_in / project_out, is refused by the
    BLIP-2 config: the image features replace token embeddings.)"""

    def __init__(self, cfg: OPTConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = cfg
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size else None
        self.embed_tokens = tables.embedding(cfg.vocab_size, cfg.word_embed_proj_dim, padding_idx=pad, **kw)
        self.embed_positions = tables.embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = None
        if cfg.final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine,
                                                 **kw)
        self.gradient_checkpointing = False  # layers.set_gradient_checkpointing turns it on

    def forward(self, inputs_embeds, position_ids, attn_mask=None, is_causal=False, cache=None, slot=0,
                first_row: int = 0):
        """inputs_embeds (B, L, D); position_ids int (B, L) (0 for the first real token); attn_mask
        bool broadcastable to (B, 1, L, S) or None; cache: a StaticKVCache or None. first_row:
        only rows [first_row, L) are read: the last layer computes those alone
        (vlmfast/models/last_rows.py). Returns (B, L - first_row, D) after the final LayerNorm."""
        positions = self.embed_positions(position_ids + POSITION_OFFSET)
        x = inputs_embeds + positions.to(inputs_embeds.dtype)
        if not self.layers:
            x = x[:, first_row:]
        checkpointing = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = first_row if i == last else 0
            if checkpointing:
                x = checkpoint(layer, x, attn_mask, is_causal, None, 0, rows, use_reentrant=False)
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, attn_mask, is_causal, kv, slot, rows)
        return x if self.final_layer_norm is None else self.final_layer_norm(x)
