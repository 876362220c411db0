"""Target sizes against transformers' own size functions on thousands of random (height, width)
pairs, extreme aspect ratios included: one pixel off changes every output value."""

import numpy as np
import pytest

from tests.processing.oracle import transformers
from vlmfast.processing import geometry
from vlmfast.processing.geometry import center_crop

from transformers.image_transforms import center_crop as hf_center_crop  # noqa: E402
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio  # noqa: E402
from transformers.models.smolvlm import image_processing_pil_smolvlm as hf_smolvlm  # noqa: E402


def random_sizes(count: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 3), (4095, 4097), (8000, 6000)]
    for _ in range(count):
        if rng.random() < 0.3:  # extreme aspect ratios
            sizes.append((int(rng.integers(1, 40)), int(rng.integers(100, 9000)))[:: 1 if rng.random() < 0.5 else -1])
        else:
            sizes.append((int(rng.integers(1, 5000)), int(rng.integers(1, 5000))))
    return sizes


def shape_only(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.uint8(0), (1, height, width))  # channels first, no memory


@pytest.mark.parametrize("shortest", [1, 224, 336, 384])
def test_shortest_edge(shortest):
    for height, width in random_sizes(1500, seed=shortest):
        want = get_resize_output_image_size(
            shape_only(height, width), size=shortest, default_to_square=False, input_data_format="channels_first"
        )
        assert geometry.shortest_edge_size(height, width, shortest) == tuple(want), (height, width)


@pytest.mark.parametrize("shortest, longest", [(224, 300), (800, 1333), (48, 80)])
def test_shortest_and_longest_edge(shortest, longest):
    for height, width in random_sizes(1500, seed=longest):
        want = get_size_with_aspect_ratio((height, width), shortest, longest)
        assert geometry.shortest_longest_edge_size(height, width, shortest, longest) == tuple(want), (height, width)


@pytest.mark.parametrize("longest, tile", [(2048, 512), (1456, 364), (128, 64), (200, 48), (5000, 512)])
def test_smolvlm_sizes(longest, tile):
    hf = transformers.SmolVLMImageProcessorPil()
    hf.resize = lambda image, size, resample=None: (size.height, size.width)  # report the size only
    for height, width in random_sizes(1500, seed=tile):
        want = hf_smolvlm.get_resize_output_image_size(shape_only(height, width), resolution_max_side=longest)
        assert geometry.smolvlm_resize_size(height, width, longest) == tuple(want), (height, width)
        want = hf.resize_for_vision_encoder(shape_only(height, width), tile)
        assert geometry.tile_multiple_size(height, width, tile) == tuple(want), (height, width)


@pytest.mark.parametrize("image_size", [(7, 9), (8, 8), (5, 12), (20, 3), (1, 1)])
@pytest.mark.parametrize("crop", [(4, 4), (8, 8), (7, 10), (3, 13), (21, 2)])
def test_center_crop_with_and_without_padding(image_size, crop):
    pixels = np.random.default_rng(0).integers(1, 256, size=image_size + (3,), dtype=np.uint8)
    want = hf_center_crop(pixels, crop, input_data_format="channels_last")
    got = center_crop(pixels, crop)
    assert got.shape == want.shape and np.array_equal(got, want)
