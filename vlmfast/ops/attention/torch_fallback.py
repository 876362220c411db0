"""What the kernels do not cover runs in torch's own SDPA, with the same meaning of every
argument: dropout, a value head dim Ev != E, E > 256, a float mask that needs a gradient."""

import torch

from vlmfast.ops.rotary import apply_rotary_emb


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary):
    """torch.nn.functional.scaled_dot_product_attention, with vlmfast's extras applied first:
    rotary tables, and is_causal together with attn_mask (torch refuses both)."""
    if rotary is not None:
        query, key = apply_rotary_emb(query, *rotary), apply_rotary_emb(key, *rotary)
    if is_causal and attn_mask is not None:
        length, keys = query.shape[-2], key.shape[-2]
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        # Not every torch SDPA backend takes enable_gqa: repeat the kv heads instead.
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, dim=-3), value.repeat_interleave(group, dim=-3)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
