"""ViT classifier: class-token and mean pooling, forward_features/forward_head, the attention
module against an explicit softmax formula, gradients, bf16."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast.models import ViT, ViTConfig
from vlmfast.models.layers import SelfAttention


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=(24, 40), patch_size=8, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
               num_attention_heads=1, num_classes=7)
    cfg.update(kw)
    return ViT(ViTConfig(**cfg))


def test_token_pooling_uses_the_class_token():
    model = small()
    x = torch.randn(3, 3, 24, 40)
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 3 * 5, 40)  # non-square grid
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
    assert model(x).shape == (3, 7)


def test_mean_pooling_without_class_token():
    model = small(global_pool="avg", class_token=False)
    x = torch.randn(1, 3, 24, 40)
    feats = model.forward_features(x)
    assert feats.shape == (1, 15, 40)
    assert_close(model.forward_head(feats, pre_logits=True), feats.double().mean(1), name="pooled")


def test_self_attention_equals_the_softmax_formula():
    torch.manual_seed(1)
    attn = SelfAttention(80, 2).double()  # head dim 40
    x = torch.randn(3, 113, 80, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(3, 113, 3, 2, 40).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 40**0.5, dim=-1)
    expected = attn.out_proj((weights @ v).transpose(1, 2).reshape(3, 113, 80))
    mask = torch.rand(3, 1, 113, 113) > 0.3
    mask[..., 0] = True
    masked = torch.softmax((q @ k.transpose(-1, -2) / 40**0.5).masked_fill(~mask, float("-inf")), dim=-1)
    expected_masked = attn.out_proj((masked @ v).transpose(1, 2).reshape(3, 113, 80))
    fast = SelfAttention(80, 2)
    fast.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    assert_close(fast(x.float()), expected.detach(), name="attention")
    assert_close(fast(x.float(), attn_mask=mask), expected_masked.detach(), name="masked attention")


def test_gradients_reach_every_parameter_and_bf16_runs():
    model = small()
    model(torch.randn(2, 3, 24, 40)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    low = small().to(torch.bfloat16)
    assert low(torch.randn(2, 3, 24, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_config_raises():
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(global_pool="max")
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(global_pool="token", class_token=False)
    with pytest.raises(ValueError, match="image_size"):
        ViTConfig(image_size=30, patch_size=16)
    with pytest.raises(ValueError, match=r"pixel_values: expected \(B, 3, 24, 40\)"):
        small()(torch.randn(1, 3, 40, 24))
