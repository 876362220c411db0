"""vlmfast's LlavaProcessor against transformers' (AutoProcessor on the same folder): the rendered
chat template, input_ids / attention_mask of a left-padded batch with several images per prompt,
pixel_values bit for bit (also padded to a square first), and the input checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.llava.checkpoint import IMAGE_SIZE, PATCH, hf_processor, write_processor_files
from vlmfast.processing.llava import LlavaProcessor


def images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
     {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
     {"role": "user", "content": [{"type": "text", "text": "And the dog?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "How many dogs are there?"}]}],
]


@pytest.fixture(scope="module", params=["default", "full"])
def folder(request, tmp_path_factory):
    return write_processor_files(tmp_path_factory.mktemp("llava-proc"), strategy=request.param)


def test_chat_template_and_batch_equal_transformers(folder):
    ours, theirs = LlavaProcessor.from_pretrained(folder), hf_processor(folder)
    texts = ours.apply_chat_template(CONVERSATIONS, add_generation_prompt=True)
    assert texts == [theirs.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS]
    assert texts[0] == "USER: <image>\nWhat is in this image? ASSISTANT:"
    pictures = images(0, [(40, 56), (32, 32), (77, 45)])
    got = ours(texts, [[pictures[0]], pictures[1:], []])
    want = theirs(text=texts, images=pictures, padding=True, return_tensors="pt")
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    for key in got:
        assert torch.equal(got[key], want[key]), key
    per_image = (IMAGE_SIZE // PATCH) ** 2 + (ours.vision_feature_select_strategy == "full")
    assert (got["input_ids"] == ours.image_token_id).sum().item() == 3 * per_image


def test_pad_to_square_equals_transformers(tmp_path):
    folder = write_processor_files(tmp_path, do_pad=True)
    ours, theirs = LlavaProcessor.from_pretrained(folder), hf_processor(folder)
    pictures = images(1, [(30, 61), (64, 20)])
    got = ours(["<image> a", "b <image>"], pictures)["pixel_values"]
    want = theirs(text=["<image> a", "b <image>"], images=pictures, padding=True, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, want)


def test_uint8_output_and_decoding(folder):
    ours = LlavaProcessor.from_pretrained(folder)
    picture = images(2, [(50, 33)])
    floats = ours(["<image> hi"], picture)
    raw = ours(["<image> hi"], picture, output="uint8")
    assert raw["pixel_values"].dtype == torch.uint8 and raw["pixel_values"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert torch.equal(raw["input_ids"], floats["input_ids"])
    ids = ours(["A cat sitting on a red mat."])["input_ids"][0]
    assert ours.decode(ids) == "A cat sitting on a red mat."


def test_bad_inputs_name_the_argument(folder):
    ours = LlavaProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="images: expected one image per <image>"):
        ours(["<image> <image> two"], images(3, [(32, 32)]))
    with pytest.raises(ValueError, match="images: text has"):
        ours(["<image> one"])
    with pytest.raises(TypeError, match="text"):
        ours([3])
