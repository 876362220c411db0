"""Dynamic resolution: pack_images / patchify_image against per-image references and against
Qwen2-VL's vision positions and sequence lengths in transformers."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _mixed_images(generator, patch, device):
    """uint8 and float images of different sizes, two of them equal (one patch_embed batch)."""
    def u8(h, w):
        return torch.randint(0, 256, (h * patch, w * patch, 3), dtype=torch.uint8, generator=generator).to(device)

    return [u8(2, 3), torch.randn(3, 4 * patch, 2 * patch, generator=generator).to(device), u8(1, 1), u8(2, 3)]


def _expected_tokens(image, weight, bias):
    batched = image[None]
    return reference.patch_embed(batched if batched.dtype == torch.uint8 else batched.double(), weight.double(),
                                 bias.double(), MEAN, STD)[0]


def test_pack_images_matches_each_image_alone(backend):
    generator = torch.Generator().manual_seed(0)
    patch, d = 8, 7
    images = _mixed_images(generator, patch, backend.device)
    weight = (torch.randn(d, 3, patch, patch, generator=generator) * 0.1).to(backend.device).requires_grad_()
    bias = torch.randn(d, generator=generator).to(backend.device)

    packed = ops.pack_images(images, weight, bias, MEAN, STD)
    assert packed.grid_sizes == [(2, 3), (4, 2), (1, 1), (2, 3)]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 6, 14, 15, 21]
    assert packed.max_seqlen == 8
    assert packed.positions.dtype == torch.int64 and packed.positions.shape == (21, 2)
    expected = torch.cat([_expected_tokens(image, weight.detach(), bias) for image in images])
    assert_close(packed.tokens, expected)
    for (rows, cols), start in zip(packed.grid_sizes, packed.cu_seqlens[:-1].tolist()):
        grid = packed.positions[start : start + rows * cols]
        assert grid.tolist() == [[r, c] for r in range(rows) for c in range(cols)]

    # Gradients reach the weight through the packing.
    packed.tokens.square().sum().backward()
    w64 = weight.detach().double().requires_grad_()
    torch.cat([_expected_tokens(image, w64, bias) for image in images]).square().sum().backward()
    assert_close(weight.grad, w64.grad, name="grad_weight")


@pytest.mark.parametrize("order, merge", [("raster", 1), ("merge2x2", 2)])
def test_positions_and_seqlens_match_qwen2_vl(order, merge):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

    patch = 14
    grids = [(4, 6), (2, 2), (6, 4)]
    images = [torch.randint(0, 256, (h * patch, w * patch, 3), dtype=torch.uint8) for h, w in grids]
    weight = torch.randn(16, 3, patch, patch) * 0.05
    packed = ops.pack_images(images, weight, order=order)

    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    assert torch.equal(packed.positions, get_vision_position_ids(grid_thw, merge))
    cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, Qwen2VLVisionConfig(patch_size=patch))
    assert torch.equal(packed.cu_seqlens, cu_seqlens.to(torch.int32))

    # Tokens follow their positions: token t is the patch at positions[t] of its image.
    for i, (start, (rows, cols)) in enumerate(zip(packed.cu_seqlens[:-1].tolist(), grids)):
        raster = reference.patch_embed(images[i][None], weight.double())[0]
        index = packed.positions[start : start + rows * cols]
        assert_close(packed.tokens[start : start + rows * cols], raster[index[:, 0] * cols + index[:, 1]])


def test_patchify_image_orders_and_rope_2d_tables():
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(3, 32, 64, generator=generator)  # a 2 x 4 patch grid
    weight = torch.randn(8, 3, 16, 16, generator=generator)
    raster, raster_positions = ops.patchify_image(image, weight, mean=MEAN, std=STD)
    assert raster.shape == (8, 8)
    assert raster_positions.tolist() == [[r, c] for r in range(2) for c in range(4)]
    assert_close(raster, reference.patch_embed(image[None].double(), weight.double(), None, MEAN, STD)[0])

    merged, merged_positions = ops.patchify_image(image, weight, mean=MEAN, std=STD, order="merge2x2")
    assert merged_positions.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert torch.equal(merged, raster[merged_positions[:, 0] * 4 + merged_positions[:, 1]])
    cos, sin = ops.rope_2d(merged_positions, 32)
    expected_cos, _ = reference.rope_2d(merged_positions, 32)
    assert cos.shape == sin.shape == (8, 16)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "images, kwargs, error, message",
    [
        ([], {}, TypeError, r"images: expected a non-empty list"),
        (torch.zeros(2, 32, 32, 3, dtype=torch.uint8), {}, TypeError, r"images: expected a non-empty list"),
        ([torch.zeros(32, 32, 3, dtype=torch.uint8), torch.zeros(1, 3, 32, 32)], {}, ValueError,
         r"images\[1\]: expected one image \(C, H, W\) float, got \(1, 3, 32, 32\)"),
        ([torch.zeros(32, 24, 3, dtype=torch.uint8)], {}, ValueError,
         r"images\[0\]: H and W must be multiples of the patch size p = 16, got H = 32, W = 24"),
        ([torch.zeros(32, 48, 3, dtype=torch.uint8)], {"order": "merge2x2"}, ValueError,
         r"order: 'merge2x2' needs an even patch grid, got 2 x 3 patches"),
        ([torch.zeros(32, 32, 3, dtype=torch.uint8)], {"order": "zigzag"}, ValueError,
         r"order: expected one of 'raster', 'merge2x2', got 'zigzag'"),
        ([torch.zeros(32, 32, 4, dtype=torch.uint8)], {}, ValueError,
         r"images: expected \(B, H, W, C\) uint8 with C = weight.shape\[1\] = 3"),
    ],
)
def test_pack_images_rejects(images, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.pack_images(images, torch.zeros(8, 3, 16, 16), **kwargs)
