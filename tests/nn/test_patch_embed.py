"""nn.PatchEmbed: equals Conv2d on normalised images, trains, packs images of any size."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast.nn import PatchEmbed
from vlmfast.ops import reference

MEAN, STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def test_matches_conv2d_and_reports_grid(backend):
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=14, in_chans=3, embed_dim=40, mean=MEAN, std=STD, img_size=(28, 42)).to(backend.device)
    assert embed.grid_size == (2, 3) and embed.num_patches == 6
    images = torch.randint(0, 256, (3, 28, 42, 3), dtype=torch.uint8, device=backend.device)
    expected = reference.patch_embed(images, embed.weight.double(), embed.bias.double(), MEAN, STD)
    assert_close(embed(images), expected)
    # The same weights as a Conv2d on normalised float images.
    conv = torch.nn.Conv2d(3, 40, 14, stride=14).to(backend.device)
    conv.load_state_dict({"weight": embed.weight.detach(), "bias": embed.bias.detach()})
    normalised = reference.normalize_images(images, MEAN, STD)
    torch.testing.assert_close(embed(images), conv(normalised).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-4)


def test_gradients_reach_parameters_and_float_images(backend):
    torch.manual_seed(1)
    embed = PatchEmbed(patch_size=8, in_chans=4, embed_dim=7).to(backend.device)
    images = torch.randn(1, 4, 16, 24, device=backend.device, requires_grad=True)
    embed(images).square().sum().backward()
    w64 = embed.weight.detach().double().requires_grad_()
    b64 = embed.bias.detach().double().requires_grad_()
    x64 = images.detach().double().requires_grad_()
    F.conv2d(x64, w64, b64, stride=8).square().sum().backward()
    assert_close(embed.weight.grad, w64.grad, name="grad_weight")
    assert_close(embed.bias.grad, b64.grad, name="grad_bias")
    assert_close(images.grad, x64.grad, name="grad_images")


def test_state_dict_holds_only_the_conv_parameters_and_dtype_keeps_normalisation():
    embed = PatchEmbed(patch_size=16, embed_dim=8, mean=MEAN, std=STD, bias=False)
    assert set(embed.state_dict()) == {"weight"}
    half = embed.to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.mean == MEAN
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert half(images).dtype == torch.bfloat16


def test_pack_images_of_different_sizes():
    torch.manual_seed(2)
    embed = PatchEmbed(patch_size=16, embed_dim=8, mean=MEAN, std=STD)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8) for h, w in [(32, 64), (48, 16)]]
    packed = embed.pack(images)
    assert packed.tokens.shape == (11, 8) and packed.cu_seqlens.tolist() == [0, 8, 11]
    for image, start, stop in [(images[0], 0, 8), (images[1], 8, 11)]:
        assert_close(packed.tokens[start:stop], embed(image[None])[0].double())


def test_mean_without_std_is_rejected():
    with pytest.raises(ValueError, match=r"mean, std: pass both"):
        PatchEmbed(mean=MEAN)
