"""The Qwen2 decoder of Qwen2-VL: vlmfast's Llama decoder (smolvlm/decoder.py: fused qkv and
gate_up, rotary through ops.apply_rotary_emb, static KV cache) with Qwen2's two differences:

- q, k and v carry a bias, o_proj does not;
- multimodal rotary (M-RoPE): a token has three positions (temporal, height, width), and the
  E/2 rotary frequencies are split in mrope_section = (s_t, s_h, s_w) consecutive parts, part c
  turning with position c. Text tokens have three equal positions (plain 1D rotary); image and
  video tokens get their grid coordinates (rope_index.py).

position_ids may be (B, L) (one position per token: the three are equal, e.g. text-only prompts
and every decode step) or (3, B, L). Either way the tables are (B * L, E/2), one row per token,
rounded through the activations' dtype as transformers rounds them.
"""

import torch
from torch import nn

from vlmfast.models.qwen2vl.config import Qwen2VLTextConfig
from vlmfast.models.smolvlm.decoder import Decoder


def section_index(mrope_section) -> torch.Tensor:
    """int64 (E/2,) on the CPU (whatever the default device: models are built on "meta"): for
    each rotary frequency, which of (temporal, height, width) turns it."""
    return torch.cat([torch.full((n,), c, dtype=torch.long, device="cpu") for c, n in enumerate(mrope_section)])


class Qwen2Decoder(Decoder):
    """Token embeddings, layers, final norm under transformers' Qwen2 names."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, device=None, dtype=None):
        super().__init__(cfg, device=device, dtype=dtype)
        width = cfg.num_attention_heads * cfg.head_dim
        for layer in self.layers:  # the Llama layer's o_proj follows attention_bias; Qwen2's has none
            layer.self_attn.o_proj = nn.Linear(width, cfg.hidden_size, bias=False, device=device, dtype=dtype)
        self._sections = section_index(cfg.mrope_section)

    def rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) or (3, B, L) -> cos, sin float32 (B * L, E/2)."""
        if position_ids.dim() == 2:
            return super().rotary_tables(position_ids, dtype)
        key = str(position_ids.device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq["cpu"].to(position_ids.device)
        sections = self._sections.to(position_ids.device)
        # per token its (t, h, w) positions, each frequency reading the one its section names:
        # float32 position x float32 frequency, the product transformers forms
        per_token = position_ids.reshape(3, -1).t().float()  # (B * L, 3)
        freqs = per_token[:, sections] * self._inv_freq[key]
        cos, sin = freqs.cos(), freqs.sin()
        if dtype != torch.float32:
            cos, sin = cos.to(dtype).float(), sin.to(dtype).float()
        return cos, sin
