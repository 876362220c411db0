"""The uint8 output path: processor(output="uint8") + ops.patch_embed(mean=, std=) gives what
conv2d gives on the processor's float32 pixel_values (the transformers-equal path)."""

import pytest
import torch

from tests.processing.synthetic import photo
from vlmfast import ops
from vlmfast.processing import CLIPImageProcessor, SiglipImageProcessor, SmolVLMImageProcessor

PATCH, DIM = 16, 24


def conv_tokens(pixel_values, weight, bias):
    return torch.nn.functional.conv2d(pixel_values, weight, bias, stride=PATCH).flatten(2).transpose(1, 2)


@pytest.fixture
def layer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(DIM, 3, PATCH, PATCH, generator=generator) * 0.05
    bias = torch.randn(DIM, generator=generator)
    return weight, bias


@pytest.mark.parametrize(
    "processor",
    [
        CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 64}),
        SiglipImageProcessor(size={"height": 32, "width": 48}, resample=2),
        SiglipImageProcessor(size={"height": 32, "width": 32}, do_rescale=False, image_mean=[9, 99, 199]),
        SiglipImageProcessor(size={"height": 32, "width": 32}, rescale_factor=1 / 127.5, do_normalize=False),
    ],
    ids=["clip", "siglip", "no-rescale", "other-rescale-no-normalize"],
)
def test_uint8_then_patch_embed_equals_float_then_conv(processor, layer):
    weight, bias = layer
    images = [photo(50, 70, seed=1), photo(123, 45, seed=2), photo(9, 11, seed=3)]
    mean, std = processor.patch_embed_normalization()
    fused = ops.patch_embed(processor(images, output="uint8").pixel_values, weight, bias, mean=mean, std=std)
    want = conv_tokens(processor(images).pixel_values, weight, bias)
    scale = want.abs().max().item()
    torch.testing.assert_close(fused, want, rtol=0, atol=2e-5 * max(scale, 1.0))


def test_smolvlm_frames(layer):
    weight, bias = layer
    processor = SmolVLMImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    batch_u8 = processor([[photo(50, 90, seed=4)], [photo(90, 20, seed=5), photo(5, 5, seed=6)]], output="uint8")
    batch = processor([[photo(50, 90, seed=4)], [photo(90, 20, seed=5), photo(5, 5, seed=6)]])
    real = batch.pixel_attention_mask.flatten(0, 1).any(dim=(1, 2))  # padding frames are dropped by the model
    frames_u8 = batch_u8.pixel_values.flatten(0, 1)[real]
    frames = batch.pixel_values.flatten(0, 1)[real]
    mean, std = processor.patch_embed_normalization()
    fused = ops.patch_embed(frames_u8, weight, bias, mean=mean, std=std)
    torch.testing.assert_close(fused, conv_tokens(frames, weight, bias), rtol=0, atol=1e-4)
