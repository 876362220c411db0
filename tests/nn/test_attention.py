"""vlmfast.nn.Attention against the same computation written with torch modules and SDPA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.nn import Attention


def _unfused(attn: Attention, x, attn_mask=None, rotary=None, is_causal=False):
    """The module's math spelled out: projection, split, qk-norm, rotary, SDPA, projection."""
    batch, tokens, _ = x.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(batch, tokens, heads + 2 * kv_heads, head_dim)
    q = qkv[:, :, :heads].transpose(1, 2)
    k = qkv[:, :, heads:heads + kv_heads].transpose(1, 2)
    v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rotary is not None:
        q = ops.reference.apply_rotary_emb(q, *rotary)
        k = ops.reference.apply_rotary_emb(k, *rotary)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, -1), attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize(
    "options",
    [
        dict(dim=64, num_heads=4),                                               # ViT style
        dict(dim=96, num_heads=6, num_kv_heads=2, head_dim=40, qkv_bias=False),   # GQA, E 40
        dict(dim=72, num_heads=2, qk_norm=True),                                  # qk-norm, E 36
        dict(dim=64, num_heads=2, qk_norm=True, norm_layer=nn.RMSNorm, is_causal=True),
    ],
)
def test_attention_matches_unfused(backend, options):
    torch.manual_seed(0)
    attn = Attention(**options).to(backend.device)
    with torch.no_grad():
        for p in attn.parameters():  # norms start at 1/0: perturb them so qk-norm is tested
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 13, options["dim"], device=backend.device)
    out = attn(x)
    expected = _unfused(attn, x, is_causal=options.get("is_causal", False))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_gradients_mask_and_rotary(backend):
    torch.manual_seed(1)
    attn = Attention(dim=64, num_heads=4, num_kv_heads=2).to(backend.device)
    x = torch.randn(2, 11, 64, device=backend.device, requires_grad=True)
    padding = torch.arange(11, device=backend.device)[None, :] < torch.tensor([11, 7], device=backend.device)[:, None]
    mask = padding[:, None, None, :]
    angles = torch.rand(11, 8, device=backend.device) * 6.28
    rotary = (angles.cos(), angles.sin())

    out = attn(x, mask, rotary=rotary)
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    expected = _unfused(attn, x, mask, rotary)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attention_bfloat16_against_float64(backend):
    torch.manual_seed(2)
    attn = Attention(dim=80, num_heads=1, device=backend.device, dtype=torch.bfloat16)
    assert attn.qkv.weight.dtype == torch.bfloat16 and attn.qkv.weight.device.type == backend.device.type
    x = torch.randn(2, 9, 80, device=backend.device, dtype=torch.bfloat16)
    out = attn(x)
    exact = _unfused(attn.double(), x.double())
    low = _unfused(attn.bfloat16(), x)
    assert_close(out, exact, low)


def test_attention_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match=r"num_kv_heads: expected a positive divisor of num_heads = 6, got 4"):
        Attention(96, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"head_dim: dim = 100 is not divisible by num_heads = 6"):
        Attention(100, num_heads=6)
    attn = Attention(64, num_heads=4)
    with pytest.raises(ValueError, match=r"x: expected \(B, N, dim\) = \(B, N, 64\), got \(2, 5, 32\)"):
        attn(torch.randn(2, 5, 32))
    assert "num_kv_heads=4" in repr(attn)
