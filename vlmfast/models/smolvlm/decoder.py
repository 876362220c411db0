"""The Llama / SmolLM2 decoder of SmolVLM: GQA attention with 1D rotary, RMSNorm, SwiGLU.

Two fusions against transformers' layout (checkpoint keys are mapped on load):
  self_attn.qkv   = [q_proj; k_proj; v_proj]   one GEMM, (H + 2 Hkv) * E outputs
  mlp.gate_up     = [gate_proj; up_proj]        one GEMM, 2 * I outputs
Rotary goes through vlmfast.ops.apply_rotary_emb with one table row per token (T = B * L rows),
so left-padded rows with their own positions need no per-row loop. With a KV cache, keys and
values of the new tokens are written in place into slots [slot, slot + L) and attention reads
the cache up to slot + L.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast.generation.cache import write_kv
from vlmfast.models import tables
from vlmfast.models.last_rows import rows_mask
from vlmfast.models.smolvlm import _ops, packing
from vlmfast.models.smolvlm.config import SmolVLMTextConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x):
        return _ops.rms_norm(x, self.weight, self.eps)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: SmolVLMTextConfig, *, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, width, bias=cfg.attention_bias, device=device, dtype=dtype)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias, device=device, dtype=dtype
        )

    def forward(self, x, cos, sin, attn_mask=None, is_causal=False, kv=None, slot: int = 0, first_row: int = 0):
        """x: (B, L, D); cos, sin: (B * L, E/2) float32, row b * L + i for token i of row b.
        attn_mask: bool broadcastable to (B, 1, L, S) or None. kv: (k, v) cache buffers
        (B, Hkv, max_len, E) or None; slot: the first slot written (an int), or an int64 (L,)
        tensor of slots, then attention reads all max_len slots (S = max_len). first_row: the
        output of rows [first_row, L) alone (every row's keys and values still made: see
        vlmfast/models/last_rows.py). Returns (B, L - first_row, D)."""
        B, L, _ = x.shape
        H, Hkv, E = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = packing.linear(x, self.qkv, self.qkv.weight, self.qkv.bias).view(B * L, H + 2 * Hkv, E)
        qk = _ops.rotary(qkv[:, : H + Hkv], cos, sin)  # q and k heads rotated in one call
        q = qk[:, :H].view(B, L, H, E)[:, first_row:].transpose(1, 2)
        k = qk[:, H:].view(B, L, Hkv, E).transpose(1, 2)
        v = qkv[:, H + Hkv :].view(B, L, Hkv, E).transpose(1, 2)
        if kv is not None:
            k, v = write_kv(kv, k, v, slot)
        if first_row:
            attn_mask, is_causal = rows_mask(attn_mask, is_causal, first_row, L, k.shape[2], x.device)
        out = _ops.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, L - first_row, H * E)
        return packing.linear(out, self.o_proj, self.o_proj.weight, self.o_proj.bias)


class SwiGLU(nn.Module):
    def __init__(self, cfg: SmolVLMTextConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x):
        gate_up = packing.linear(x, self.gate_up, self.gate_up.weight, self.gate_up.bias)
        return packing.linear(_ops.swiglu(gate_up), self.down_proj, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SmolVLMTextConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = DecoderAttention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg, **kw)

    def forward(self, x, cos, sin, attn_mask=None, is_causal=False, kv=None, slot: int = 0, first_row: int = 0):
        """(B, L, D) -> (B, L - first_row, D): rows [first_row, L) of the layer's output."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, kv, slot, first_row)
        x = x[:, first_row:] + attended
        return x + self.mlp(self.post_attention_layernorm(x))


def inverse_frequencies(cfg: SmolVLMTextConfig) -> torch.Tensor:
    """float32 (E/2,) as transformers computes them (on the CPU, whatever the default device)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    return inv_freq


class Decoder(nn.Module):
    """Token embeddings, layers, final norm (transformers' LlamaModel names)."""

    def __init__(self, cfg: SmolVLMTextConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        kw = dict(device=device, dtype=dtype)
        # padding_idx as transformers sets it: the pad row gets no gradient in training
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size else None
        self.embed_tokens = tables.embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad, **kw)
        self.layers = nn.ModuleList(DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self._inv_freq = {"cpu": inverse_frequencies(cfg)}  # per device; not a parameter: stays float32
        # set_gradient_checkpointing(model, True) turns it on: without a cache and with gradients
        # on, each layer's activations are recomputed in the backward instead of kept
        self.gradient_checkpointing = False

    def rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) -> cos, sin float32 (B * L, E/2), rounded through `dtype` as
        transformers rounds its tables to the activations' dtype."""
        device = position_ids.device
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq["cpu"].to(device)
        freqs = position_ids.reshape(-1, 1).float() * self._inv_freq[key]
        cos, sin = freqs.cos(), freqs.sin()
        if dtype != torch.float32:
            cos, sin = cos.to(dtype).float(), sin.to(dtype).float()
        return cos, sin

    def forward(self, inputs_embeds, position_ids, attn_mask=None, is_causal=False, cache=None, slot: int = 0,
                first_row: int = 0):
        """inputs_embeds (B, L, D); position_ids int (B, L); attn_mask bool broadcastable to
        (B, 1, L, S) (S = slot + L) or None; cache: a StaticKVCache or None. first_row: only
        rows [first_row, L) are read (the labelled ones of a loss, a prefill's last): the last
        layer computes those alone (vlmfast/models/last_rows.py). Returns the normed hidden
        states (B, L - first_row, D)."""
        cos, sin = self.rotary_tables(position_ids, inputs_embeds.dtype)
        x = inputs_embeds if self.layers else inputs_embeds[:, first_row:]
        checkpointing = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = first_row if i == last else 0
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, attn_mask, is_causal, None, 0, rows, use_reentrant=False)
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, cos, sin, attn_mask, is_causal, kv, slot, rows)
        return self.norm(x)
