"""CLIP / SigLIP processors against transformers' CLIPImageProcessorPil / SiglipImageProcessorPil."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.processing.oracle import hf_processor, hf_run, write_config
from tests.processing.synthetic import photo, with_alpha
from vlmfast.processing import CLIPImageProcessor, SiglipImageProcessor, image_processor_from_pretrained

# square, landscape, portrait, odd, very tall, very wide, tiny
SIZES = [(224, 224), (480, 640), (641, 479), (197, 113), (1000, 37), (29, 800), (1, 1), (2, 3), (7, 5)]

CLIP_B32 = {  # openai/clip-vit-base-patch32
    "image_processor_type": "CLIPImageProcessor",
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
CLIP_SMALL = {  # crop larger than the resized short edge: exercises the zero padding of the crop
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 40},
    "crop_size": {"height": 48, "width": 36},
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
}
CLIP_SHORT_LONG = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 48, "longest_edge": 80},
    "do_center_crop": False,
}
SIGLIP_384 = {  # google/siglip-so400m-patch14-384
    "image_processor_type": "SiglipImageProcessor",
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
SIGLIP_BILINEAR = {
    "image_processor_type": "SiglipImageProcessor",
    "resample": 2,
    "size": {"height": 40, "width": 56},
    "image_mean": [0.1, 0.2, 0.3],
    "image_std": [0.9, 0.8, 0.7],
}


def both(tmp_path, config, name):
    directory = write_config(tmp_path / "ckpt", config)
    return image_processor_from_pretrained(directory), hf_processor(name, directory)


def assert_same(ours, theirs, images):
    got = ours(images).pixel_values
    want = hf_run(theirs, images)["pixel_values"]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous()
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize(
    "config, name",
    [
        (CLIP_B32, "CLIPImageProcessor"),
        (CLIP_SMALL, "CLIPImageProcessor"),
        (CLIP_SHORT_LONG, "CLIPImageProcessor"),
        (SIGLIP_384, "SiglipImageProcessor"),
        (SIGLIP_BILINEAR, "SiglipImageProcessor"),
    ],
    ids=["clip-b32", "clip-crop-pads", "clip-short-long", "siglip-384", "siglip-bilinear"],
)
def test_equals_transformers_on_photos(tmp_path, config, name):
    ours, theirs = both(tmp_path, config, name)
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    if config.get("do_center_crop") is False:  # no crop: sizes differ, so one image at a time
        for image in images:
            assert_same(ours, theirs, [image])
            assert ours([image]).pixel_values.shape[-2:] == ours.output_size(image.height, image.width)
    else:
        assert_same(ours, theirs, images)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "PA-transparency", "CMYK", "YCbCr", "I;16"])
def test_pil_modes_equal_transformers(tmp_path, mode):
    ours, theirs = both(tmp_path, CLIP_SMALL, "CLIPImageProcessor")
    rgb = photo(53, 71, seed=4)
    if mode == "RGBA":
        image = with_alpha(rgb)
    elif mode == "LA":
        image = with_alpha(rgb).convert("LA")
    elif mode == "PA-transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 5
    elif mode == "I;16":
        # A deliberate difference: transformers (Pillow's convert) clips 16-bit values at 255, we
        # scale them to 8 bits. So 16-bit v * 257 must give what transformers gives for 8-bit v.
        eight = np.asarray(rgb.convert("L"))
        image = Image.fromarray(eight.astype(np.uint16) * 257)
        assert image.mode == "I;16"
        got = ours([image]).pixel_values
        want = hf_run(theirs, [Image.fromarray(eight)])["pixel_values"]
        assert torch.equal(got, want)
        return
    else:
        image = rgb.convert(mode)
    assert_same(ours, theirs, [image])


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_uint8_arrays_equal_transformers(tmp_path, channels):
    ours, theirs = both(tmp_path, CLIP_SMALL, "CLIPImageProcessor")
    pixels = np.asarray(with_alpha(photo(37, 59, seed=2)))[..., : max(channels, 1)]
    if channels == 1:
        pixels = pixels[..., :1]
    assert_same(ours, theirs, [pixels])
    # a torch uint8 tensor, channels last, reads the same
    assert torch.equal(ours([torch.from_numpy(pixels.copy())]).pixel_values, ours([pixels]).pixel_values)


def test_uint8_output_is_the_resized_cropped_image(tmp_path):
    ours, theirs = both(tmp_path, {**CLIP_SMALL, "do_rescale": False, "do_normalize": False}, "CLIPImageProcessor")
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    got = ours(images, output="uint8").pixel_values
    want = hf_run(theirs, images)["pixel_values"]  # no rescale / normalise: uint8 (B, C, H, W)
    assert got.dtype == torch.uint8 and got.shape == (len(images), 48, 36, 3)
    assert torch.equal(got.permute(0, 3, 1, 2), want.to(torch.uint8))


@pytest.mark.parametrize("config", [CLIP_B32, SIGLIP_BILINEAR, {**SIGLIP_BILINEAR, "do_rescale": False}])
def test_patch_embed_normalization_folds_rescale_and_normalise(tmp_path, config):
    ours, _ = both(tmp_path, config, "CLIPImageProcessor" if "CLIP" in config["image_processor_type"] else "SiglipImageProcessor")
    images = [photo(61, 45, seed=7), photo(30, 90, seed=8)]
    pixels = ours(images, output="uint8").pixel_values
    mean, std = ours.patch_embed_normalization()
    assert len(mean) == len(std) == 3
    # what ops.patch_embed computes before its GEMM: (v / 255 - mean) / std
    folded = (pixels.double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    want = ours(images).pixel_values.double()
    torch.testing.assert_close(folded.permute(0, 3, 1, 2), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_threads_give_the_same_result():
    processor = CLIPImageProcessor()
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    assert torch.equal(processor(images, max_workers=3).pixel_values, processor(images).pixel_values)


def test_defaults_equal_transformers_defaults():
    from tests.processing.oracle import transformers

    for ours, theirs in [(CLIPImageProcessor(), "CLIPImageProcessorPil"), (SiglipImageProcessor(), "SiglipImageProcessorPil")]:
        theirs = getattr(transformers, theirs)()
        images = [photo(90, 130, seed=3)]
        assert torch.equal(ours(images).pixel_values, hf_run(theirs, images)["pixel_values"])


# ---- bad input -------------------------------------------------------------------------------


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"images\[1\]: expected \(H, W\) or \(H, W, C\) with C in 1, 3 or 4"):
        CLIPImageProcessor()([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 5), np.uint8)])
    with pytest.raises(ValueError, match=r"expected \(H, W\) or \(H, W, C\).*got \(2, 8, 8, 3\)"):
        CLIPImageProcessor()(np.zeros((2, 8, 8, 3), np.uint8))


def test_float_pixels_rejected():
    with pytest.raises(TypeError, match=r"images\[0\]: expected uint8 pixels \(H, W, C\).*float32"):
        CLIPImageProcessor()([np.zeros((8, 8, 3), np.float32)])


def test_not_an_image():
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image or a uint8 array"):
        CLIPImageProcessor()(["photo.jpg"])


def test_empty_list():
    with pytest.raises(ValueError, match="images: expected at least one image, got an empty list"):
        SiglipImageProcessor()([])


def test_convert_rgb_off_needs_rgb():
    with pytest.raises(ValueError, match="do_convert_rgb is false, so expected an 'RGB' image, got mode 'L'"):
        CLIPImageProcessor(do_convert_rgb=False)([photo(8, 8).convert("L")])


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"size": {"max_height": 10, "max_width": 10}}, ValueError, r"size: unsupported keys \['max_height', 'max_width'\]"),
        ({"size": {"shortest_edge": 0}}, ValueError, "size: shortest_edge must be a positive int, got 0"),
        ({"resample": 9}, ValueError, r"resample: expected a PIL.Image.Resampling value.*got 9"),
        ({"image_mean": [0.5, 0.5]}, ValueError, r"image_mean: expected 3 floats \(one per RGB channel\)"),
        ({"image_std": [0.5, 0.0, 0.5]}, ValueError, "image_std: expected non-zero values"),
        ({"do_pad": True}, ValueError, "do_pad: padding to the largest image is not supported"),
        ({"do_resize": "yes"}, ValueError, "do_resize: expected true or false, got 'yes'"),
        ({"rescale_factor": -1}, ValueError, "rescale_factor: expected a positive number, got -1"),
    ],
)
def test_unsupported_config(config, error, message):
    with pytest.raises(error, match=message):
        CLIPImageProcessor(config)


def test_unknown_option_and_output_mode():
    with pytest.raises(TypeError, match=r"CLIPImageProcessor: unknown option\(s\) \['crop'\]"):
        CLIPImageProcessor(crop=True)
    with pytest.raises(ValueError, match=r"output: expected one of \('float32', 'uint8'\), got 'float16'"):
        CLIPImageProcessor()([photo(8, 8)], output="float16")


def test_sizes_that_do_not_stack():
    with pytest.raises(ValueError, match="images: sizes differ after preprocessing"):
        CLIPImageProcessor(do_center_crop=False)([photo(10, 20), photo(20, 10)])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="path: expected a checkpoint directory with preprocessor_config.json"):
        image_processor_from_pretrained(tmp_path / "missing")
    directory = write_config(tmp_path / "other", {"image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(ValueError, match="image_processor_type: unsupported 'LlavaNextImageProcessor'"):
        image_processor_from_pretrained(directory)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        image_processor_from_pretrained(tmp_path / "bad")
