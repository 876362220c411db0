"""Qwen2VLProcessor (tokenizers + jinja2 + the Qwen2-VL image processor, no transformers) against
transformers' Qwen2VLProcessor with its PIL image processor, on the same offline checkpoint
folder: chat template, input_ids / attention_mask / mm_token_type_ids / pixel_values /
image_grid_thw bit for bit; smart_resize against transformers' for many sizes; the video patch
layout against an element-by-element reading of its definition; bad input."""

import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.chat_inputs import random_image as _image  # noqa: E402
from tests.models.chat_inputs import user_turn as _user  # noqa: E402
from tests.models.qwen2vl.helpers import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS, write_processor_files  # noqa: E402
from vlmfast.processing.qwen2vl import smart_resize  # noqa: E402
from vlmfast.processing.qwen2vl_processor import Qwen2VLProcessor  # noqa: E402


CONVERSATIONS = [
    [_user("How many dogs are there?")],
    [_user(None, "What is in this image?")],
    [_user(None, None, "Compare the two images.")],
    [{"role": "system", "content": "Be brief."}, _user("Hi"),
     {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}, _user(None, "And this?")],
    [{"role": "user", "content": "A plain string."}],
]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as HFProcessor

    class ImagesOnly(HFProcessor):  # its video processor needs torchvision, not installed here
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    path = write_processor_files(tmp_path_factory.mktemp("qwen2vl_proc"))
    theirs = ImagesOnly(image_processor=transformers.Qwen2VLImageProcessorPil.from_pretrained(path),
                        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                        chat_template=CHAT_TEMPLATE)
    return Qwen2VLProcessor.from_pretrained(path), theirs


@pytest.mark.parametrize("generation", [True, False])
def test_chat_template_matches_transformers(processors, generation):
    ours, theirs = processors
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation) == \
            theirs.apply_chat_template(conversation, add_generation_prompt=generation)
    numbered = ours.apply_chat_template(CONVERSATIONS[2], add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Picture 2: " in numbered


def test_inputs_match_transformers_batch_of_0_1_2_images(processors):
    """A small image scaled up to min_pixels, a thin one, a large one scaled down to max_pixels."""
    ours, theirs = processors
    texts = [theirs.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS[:3]]
    images = [_image(30, 41, 0), _image(150, 33, 1), _image(333, 250, 2)]
    want = theirs(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    got = ours(texts, [[], [images[0]], images[1:]])
    assert set(got) == set(want)
    for key, value in got.items():
        assert value.dtype == want[key].dtype, key
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    assert got["image_grid_thw"].tolist()[2] == [1, 8, 6]  # 333 x 250 -> 112 x 84 pixels, under the 12544 cap
    # a flat list of images in prompt order is the same
    flat = ours(texts, images)
    assert all(torch.equal(flat[k], got[k]) for k in got)
    assert ours.batch_decode(got["input_ids"][:1, -6:], skip_special_tokens=False) == \
        theirs.batch_decode(want["input_ids"][:1, -6:], skip_special_tokens=False)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2)) if max(h, w) / min(h, w) <= 200]
    sizes += [(28, 28), (27, 29), (56, 56), (1, 150), (4000, 20), (3584, 3584)]
    for h, w in sizes:
        for low, high in ((MIN_PIXELS, MAX_PIXELS), (56 * 56, 28 * 28 * 1280)):
            assert smart_resize(h, w, 28, low, high) == theirs(h, w, 28, low, high), (h, w, low, high)


def test_video_patches_follow_their_definition(processors):
    """Three 56 x 28 frames (no resize: already multiples of 28 within the limits): padded to 4 by
    repeating the last, 2 temporal patches of 4 x 2 patches; every value checked against
    pixel (frame, channel, y, x) normalised as transformers' fused video path does."""
    ours, _ = processors
    video = np.random.default_rng(3).integers(0, 256, (3, 56, 28, 3), dtype=np.uint8)
    processor = ours.video_processor
    processor.min_pixels = 28 * 28  # the video defaults want at least 128 merged tokens of pixels
    batch = processor([video])
    assert batch.video_grid_thw.tolist() == [[2, 4, 2]]
    values = batch.pixel_values_videos.view(2, 2, 1, 2, 2, 3, 2, 14, 14)  # (gt, bh, bw, mh, mw, C, tp, py, px)
    mean = torch.tensor(processor.image_mean) * 255
    std = torch.tensor(processor.image_std) * 255
    frames = torch.from_numpy(video).float()
    for gt, bh, mh, mw, c, tp in [(0, 0, 0, 0, 0, 0), (1, 1, 1, 0, 2, 1), (1, 0, 0, 1, 1, 1), (0, 1, 1, 1, 2, 0)]:
        frame = min(gt * 2 + tp, 2)  # frame 3 repeats frame 2
        y, x = (bh * 2 + mh) * 14, mw * 14
        expected = (frames[frame, y:y + 14, x:x + 14, c] - mean[c]) / std[c]
        torch.testing.assert_close(values[gt, bh, 0, mh, mw, c, tp], expected, rtol=0, atol=1e-6)
    assert (batch.metadata[0].frames_indices == [0, 1, 2])


def test_video_sampling_and_seconds_per_grid(processors, tmp_path):
    ours, _ = processors
    path = write_processor_files(tmp_path, "qwen2_5_vl")
    processor = Qwen2VLProcessor.from_pretrained(path)
    assert processor.version == "qwen2_5_vl"
    processor.video_processor.min_pixels = 28 * 28
    video = np.random.default_rng(4).integers(0, 256, (12, 28, 56, 3), dtype=np.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                          "text": "What happens?"}]}],
                                         add_generation_prompt=True)
    out = processor(text, videos=[video], video_metadata=[{"fps": 6}], do_sample_frames=True, fps=2)
    # 12 frames at 6 fps, 2 per second: 4 frames (indices 0, 3, 6, 9), 2 temporal patches of 2 x 4 patches
    assert out["video_grid_thw"].tolist() == [[2, 2, 4]]
    video_tokens = int((out["input_ids"] == processor.video_token_id).sum())
    assert int((out["mm_token_type_ids"] == 2).sum()) == video_tokens == 2 * 2 * 4 // 4
    # 2 frames per temporal patch at a sampled 2 fps: 1 second each
    torch.testing.assert_close(out["second_per_grid_ts"], torch.tensor([1.0]))
    assert out["pixel_values_videos"].shape == (2 * 2 * 4, 3 * 2 * 14 * 14)


def test_bad_input_names_the_argument(processors):
    ours, _ = processors
    text = ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    with pytest.raises(ValueError, match="images: the texts have 1 .* got 2"):
        ours([text], [_image(40, 40, 0), _image(40, 40, 1)])
    with pytest.raises(ValueError, match="images: the texts have 1 .* got 0"):
        ours([text])
    with pytest.raises(ValueError, match=r"images\[0\]: aspect ratio .* exceeds the processor's limit of 200"):
        ours([text], [_image(2, 500, 0)])
    with pytest.raises(TypeError, match="text"):
        ours(42)
    with pytest.raises(ValueError, match="videos: the texts have 0"):
        ours([text], [_image(40, 40, 0)], videos=[np.zeros((2, 28, 28, 3), dtype=np.uint8)])
    from vlmfast.processing.qwen2vl import Qwen2VLImageProcessor

    with pytest.raises(ValueError, match="min_pixels: 5000 exceeds max_pixels 4000"):
        Qwen2VLImageProcessor(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match=r"images\[0\]: 30 x 40 pixels; with do_resize false"):
        Qwen2VLImageProcessor(do_resize=False)([_image(30, 40, 0)])
