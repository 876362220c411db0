"""SmolVLM / Idefics3 processor against transformers' SmolVLMImageProcessorPil / Idefics3ImageProcessorPil:
pixel values, pixel_attention_mask and the tile grid (rows, cols) identical."""

import numpy as np
import pytest
import torch

from tests.processing.oracle import hf_processor, hf_run, transformers, write_config
from tests.processing.synthetic import photo, with_alpha
from vlmfast.processing import Idefics3ImageProcessor, SmolVLMImageProcessor, image_processor_from_pretrained

# HuggingFaceTB/SmolVLM2-256M-Video-Instruct's preprocessor_config.json (image keys).
SMOLVLM2_256M = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SmolVLMImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512},
    "processor_class": "SmolVLMProcessor",
    "resample": 1,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}
# The same rules at a small scale, so that many sizes run fast.
SMALL = {**SMOLVLM2_256M, "max_image_size": {"longest_edge": 64}, "size": {"longest_edge": 128}}

# square, landscape, portrait, odd, very tall, very wide, tiny, exactly one tile
SIZES = [(96, 96), (90, 160), (161, 89), (113, 197), (500, 21), (17, 430), (1, 1), (3, 2), (64, 64)]


def both(tmp_path, config, name="SmolVLMImageProcessor"):
    directory = write_config(tmp_path / "ckpt", config)
    return image_processor_from_pretrained(directory), hf_processor(name, directory)


def assert_same(ours, theirs, images):
    got = ours(images)
    want = hf_run(theirs, images, return_row_col_info=True)
    assert got.rows == want["rows"] and got.cols == want["cols"]
    assert got.pixel_values.dtype == torch.float32 and got.pixel_values.shape == want["pixel_values"].shape
    assert torch.equal(got.pixel_values, want["pixel_values"]), (
        f"max abs diff {(got.pixel_values - want['pixel_values']).abs().max().item()}"
    )
    if "pixel_attention_mask" in want:
        assert got.pixel_attention_mask.dtype == want["pixel_attention_mask"].dtype
        assert torch.equal(got.pixel_attention_mask, want["pixel_attention_mask"])
    else:
        assert got.pixel_attention_mask is None
    return got


@pytest.mark.parametrize("index", range(len(SIZES)), ids=[f"{h}x{w}" for h, w in SIZES])
def test_each_size_equals_transformers(tmp_path, index):
    ours, theirs = both(tmp_path, SMALL)
    height, width = SIZES[index]
    got = assert_same(ours, theirs, photo(height, width, seed=index))
    rows, cols = got.rows[0][0], got.cols[0][0]
    assert ours.tile_grid(height, width) == (rows, cols)
    frames = rows * cols + 1 if rows else 1
    assert got.pixel_values.shape == (1, frames, 3, 64, 64)


def test_batch_with_different_tile_counts_is_padded(tmp_path):
    ours, theirs = both(tmp_path, SMALL)
    images = [[photo(90, 160, 0)], [photo(500, 21, 1), photo(1, 1, 2)], [photo(64, 64, 3)]]
    got = assert_same(ours, theirs, images)
    counts = [sum(r * c + 1 if r else 1 for r, c in zip(rs, cs)) for rs, cs in zip(got.rows, got.cols)]
    assert got.pixel_values.shape[1] == max(counts)
    for sample, count in enumerate(counts):  # padding frames: all zero, masked out
        assert got.pixel_attention_mask[sample, :count].all()
        assert not got.pixel_attention_mask[sample, count:].any()
        assert not got.pixel_values[sample, count:].any()


def test_flat_list_is_one_sample_and_empty_samples(tmp_path):
    ours, theirs = both(tmp_path, SMALL)
    got = assert_same(ours, theirs, [photo(40, 70, 0), photo(70, 40, 1)])
    assert got.pixel_values.shape[0] == 1 and len(got.rows[0]) == 2
    got = assert_same(ours, theirs, [[], [photo(40, 70, 2)]])
    assert got.rows == [[], [2]] and not got.pixel_attention_mask[0].any()


@pytest.mark.parametrize(
    "change",
    [
        {"do_image_splitting": False},
        {"do_resize": False},
        {"resample": 3, "image_mean": [0.2, 0.4, 0.6], "image_std": [0.3, 0.2, 0.1]},
        {"do_normalize": False},
        {"size": {"longest_edge": 200}, "max_image_size": {"longest_edge": 48}},
        {"do_pad": False},
        {"size": {"height": 100, "width": 150}},
    ],
    ids=["no-split", "no-resize", "bicubic-other-mean", "no-normalize", "uneven-multiple", "no-pad", "fixed-size"],
)
def test_config_variants_equal_transformers(tmp_path, change):
    ours, theirs = both(tmp_path, {**SMALL, **change})
    images = [photo(90, 160, 0), with_alpha(photo(33, 75, 1)), photo(150, 7, 2).convert("L")]
    if change.get("do_pad") is False:  # without padding, samples must agree in frame count
        images = [[photo(90, 160, 0)], [photo(95, 150, 1)]]
    assert_same(ours, theirs, images)


def test_real_smolvlm2_256m_config(tmp_path):
    ours, theirs = both(tmp_path, SMOLVLM2_256M)
    got = assert_same(ours, theirs, [[photo(300, 457, 0)], [photo(700, 260, 1)]])
    assert got.pixel_values.shape[-2:] == (512, 512)
    assert got.rows == [[3]] + [[4]] and got.cols == [[4]] + [[2]]


def test_idefics3_equals_transformers(tmp_path):
    config = {**SMALL, "image_processor_type": "Idefics3ImageProcessor"}
    ours, theirs = both(tmp_path, config, "Idefics3ImageProcessor")
    assert isinstance(ours, Idefics3ImageProcessor)
    assert_same(ours, theirs, [photo(90, 160, 0), photo(161, 89, 1)])


def test_defaults_equal_transformers_defaults():
    theirs = transformers.SmolVLMImageProcessorPil()
    assert_same(SmolVLMImageProcessor(), theirs, photo(120, 200, 5))


def test_tile_grid_equals_transformers_patch_count():
    ours = SmolVLMImageProcessor(SMOLVLM2_256M)
    theirs = transformers.SmolVLMImageProcessorPil(**{k: v for k, v in SMOLVLM2_256M.items() if k in ("size", "max_image_size")})
    for height, width in [(300, 457), (700, 260), (512, 512), (1, 1), (2000, 30), (4000, 3000)]:
        patches, rows, cols = theirs.get_number_of_image_patches(height, width)
        assert ours.tile_grid(height, width) == (rows, cols)


def test_uint8_output_matches_float_output(tmp_path):
    ours = SmolVLMImageProcessor(SMALL)
    images = [[photo(90, 160, 0)], [photo(500, 21, 1), photo(3, 2, 2)]]
    floats, bytes_ = ours(images), ours(images, output="uint8")
    assert bytes_.pixel_values.dtype == torch.uint8
    assert bytes_.pixel_values.shape == floats.pixel_values.permute(0, 1, 3, 4, 2).shape
    assert torch.equal(bytes_.pixel_attention_mask, floats.pixel_attention_mask)
    assert bytes_.rows == floats.rows and bytes_.cols == floats.cols
    mean, std = ours.patch_embed_normalization()
    folded = (bytes_.pixel_values.double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    folded = folded.permute(0, 1, 4, 2, 3) * floats.pixel_attention_mask[:, :, None].double()  # padding is 0 in both
    torch.testing.assert_close(folded, floats.pixel_values.double(), rtol=0, atol=1e-6)
    assert set(floats.model_inputs()) == {"pixel_values", "pixel_attention_mask"}


def test_threads_give_the_same_result():
    ours = SmolVLMImageProcessor(SMALL)
    images = [[photo(90, 160, 0)], [photo(500, 21, 1), photo(3, 2, 2)]]
    a, b = ours(images), ours(images, max_workers=3)
    assert torch.equal(a.pixel_values, b.pixel_values) and a.rows == b.rows


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs():
    ours = SmolVLMImageProcessor(SMALL)
    with pytest.raises(ValueError, match="images: expected at least one image, got an empty list"):
        ours([])
    with pytest.raises(ValueError, match="images: expected at least one image, got only empty samples"):
        ours([[], []])
    with pytest.raises(ValueError, match=r"images\[0\]\[1\]: expected \(H, W\) or \(H, W, C\) with C in 1, 3 or 4"):
        ours([[photo(8, 8), np.zeros((8, 8, 2), np.uint8)]])
    with pytest.raises(TypeError, match="images: expected a list of images or a list of lists of images, not a mix"):
        ours([photo(8, 8), [photo(8, 8)]])
    with pytest.raises(ValueError, match="do_pad is false; frame counts"):
        SmolVLMImageProcessor(SMALL, do_pad=False)([[photo(90, 160)], [photo(90, 160), photo(8, 8)]])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"size": {"shortest_edge": 100}}, r"size: unsupported keys \['shortest_edge'\]"),
        ({"max_image_size": {"height": 64, "width": 64}}, r"max_image_size: unsupported keys \['height', 'width'\]"),
        ({"resample": "lanczos"}, "resample: expected a PIL.Image.Resampling value"),
        ({"do_image_splitting": 1}, "do_image_splitting: expected true or false, got 1"),
    ],
)
def test_unsupported_config(config, message):
    with pytest.raises(ValueError, match=message):
        SmolVLMImageProcessor({**SMALL, **config})
