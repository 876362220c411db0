"""Multi-head self-attention on vlmfast's fused attention op.

    attn = Attention(dim=768, num_heads=12)                   # ViT-B
    y = attn(x)                                              # x, y: (B, N, 768)
    y = attn(x, rotary=(cos, sin))                           # rotary fused into the kernel
    attn = Attention(576, num_heads=9, num_kv_heads=3, head_dim=64, qkv_bias=False)  # GQA

One fused Linear projects x to [q | k | v] = (H + 2 Hkv) * head_dim features; q, k, v are strided
views of it (no copy) in (B, heads, N, head_dim) order; optional qk-norm normalises each head's
q and k; the output projection maps H * head_dim back to dim.
"""

import torch
from torch import nn

from vlmfast import ops


class Attention(nn.Module):
    """Self-attention with one fused qkv projection, optional qk-norm, GQA and fused rotary.

    Arguments:
        dim: input and output feature size.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (GQA), dividing H; H when None.
        head_dim: per-head size E; dim // num_heads when None.
        qkv_bias, proj_bias: biases of the two projections.
        qk_norm: normalise q and k per head before attention (ViT-22B, Qwen3 style).
        norm_layer: the qk-norm module class, built as norm_layer(head_dim, eps=norm_eps)
            (nn.LayerNorm as timm, or nn.RMSNorm).
        is_causal: the default mask of forward (decoder self-attention).
        device, dtype: for the parameters.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = 1e-6,
        is_causal: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a positive divisor of num_heads = {num_heads}, got {num_kv_heads}"
            )
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"head_dim: dim = {dim} is not divisible by num_heads = {num_heads}; pass head_dim")
            head_dim = dim // num_heads
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.is_causal = is_causal
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(head_dim, eps=norm_eps, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, eps=norm_eps, **factory) if qk_norm else nn.Identity()
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias, **factory)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, dim) -> q (B, H, N, E), k and v (B, Hkv, N, E): views of one projection."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim); attn_mask: bool (True takes part) or float, broadcastable to
        (B, H, N, N), e.g. a (B, 1, 1, N) key-padding mask; rotary: (cos, sin) of shape
        (N, R/2) applied to q and k inside the attention kernel. Returns (B, N, dim)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, N, dim) = (B, N, {self.dim}), got {tuple(x.shape)}")
        batch, tokens, _ = x.shape
        q, k, v = self.project_qkv(x)
        out = ops.scaled_dot_product_attention(
            q, k, v, attn_mask, is_causal=self.is_causal if is_causal is None else is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads, rotary=rotary,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, is_causal={self.is_causal}")
