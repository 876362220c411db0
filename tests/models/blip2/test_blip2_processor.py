"""vlmfast's Blip2Processor against transformers 5's (AutoProcessor on the same folder): image
tokens in front of every left-padded row, pixel_values bit for bit, images alone, input checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.blip2.checkpoint import IMAGE_SIZE, QUERIES, write_processor_files
from vlmfast.processing.blip2 import Blip2Processor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_processor_files(tmp_path_factory.mktemp("blip2-proc"))


def images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_batch_equals_transformers(folder):
    from transformers import AutoProcessor

    ours, theirs = Blip2Processor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    texts = ["Question: how many dogs are there? Answer:", "A cat", ""]
    pictures = images(0, [(40, 56), (32, 32), (77, 45)])
    got = ours(texts, pictures)
    want = theirs(images=pictures, text=texts, padding=True, return_tensors="pt")
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert (got["input_ids"][:, :QUERIES] == ours.image_token_id).all()
    alone = ours(images=pictures[:1])
    assert set(alone) == {"pixel_values"} and alone["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(alone["pixel_values"], theirs(images=pictures[:1], return_tensors="pt")["pixel_values"])


def test_prompt_template_and_checks(folder):
    ours = Blip2Processor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A photo of"}]}]
    assert ours.apply_chat_template(conversation, add_generation_prompt=True) == "A photo of"
    with pytest.raises(ValueError, match="images: expected one image per prompt"):
        ours(["a", "b"], images(1, [(32, 32)]))
    with pytest.raises(ValueError, match="text, images"):
        ours()
