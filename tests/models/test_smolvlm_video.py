"""SmolVLM2 video input: vlmfast's processor against transformers' SmolVLMProcessor with its
SmolVLMVideoProcessor on the same frames (input_ids, attention_mask, pixel_values,
pixel_attention_mask, exactly), frame sampling against transformers' sample_frames, the frame
count in words against num2words, and a model forward / greedy generate on a video prompt
against transformers' SmolVLMForConditionalGeneration.

transformers' video processor calls torchvision (not installed here, never a vlmfast dependency)
for three things: resize, normalize and grayscale_to_rgb. The stand-in below does them as
torchvision does on tensors, except that resize uses Pillow's filter of the same name (what
vlmfast uses). Everything else -- config reading, sampling, the two resize sizes, rescale folded
into normalise, frame padding and its mask, metadata, timestamps and the prompt -- is
transformers' own code. test_frames_at_tile_size_match_without_any_resize checks a case where
the stand-in's resize is never asked to change a frame.
"""

import enum
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
num2words = pytest.importorskip("num2words").num2words
import transformers.image_processing_backends as hf_backends  # noqa: E402
import transformers.video_processing_utils as hf_video_utils  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402
from transformers.models.smolvlm.video_processing_smolvlm import (  # noqa: E402
    SmolVLMVideoProcessor as HFVideoProcessor,
)
from transformers.video_utils import VideoMetadata as HFVideoMetadata  # noqa: E402

from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402
from vlmfast.models.smolvlm import SmolVLM  # noqa: E402
from vlmfast.models.smolvlm.processor import SmolVLMProcessor  # noqa: E402
from vlmfast.processing.number_words import number_words  # noqa: E402
from vlmfast.processing.video import VideoMetadata, sample_frame_indices  # noqa: E402

transformers.logging.set_verbosity_error()
TILE = 32


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


PIL_FILTERS = {InterpolationMode.NEAREST: 0, InterpolationMode.LANCZOS: 1, InterpolationMode.BILINEAR: 2,
               InterpolationMode.BICUBIC: 3, InterpolationMode.BOX: 4, InterpolationMode.HAMMING: 5}


class TorchvisionStandIn:
    """torchvision.transforms.v2.functional's resize / normalize / grayscale_to_rgb on tensors;
    counts the resizes that change a frame's size."""

    InterpolationMode = InterpolationMode

    def __init__(self):
        self.size_changes = 0

    def resize(self, video, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        *lead, channels, height, width = video.shape
        if [height, width] == list(size):
            return video
        self.size_changes += 1
        frames = video.reshape(-1, channels, height, width).permute(0, 2, 3, 1).numpy()
        resized = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), resample=PIL_FILTERS[interpolation],
                                                        reducing_gap=None)) for f in frames]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).reshape(*lead, channels, *size)

    @staticmethod
    def normalize(tensor, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor if inplace else tensor.clone()).sub_(mean).div_(std)

    @staticmethod
    def grayscale_to_rgb(video):
        return video


@pytest.fixture(scope="module")
def torchvision_stand_in():
    stand_in = TorchvisionStandIn()
    with pytest.MonkeyPatch.context() as mp:
        for module in (hf_backends, hf_video_utils):
            mp.setattr(module, "tvF", stand_in, raising=False)
        mp.setattr(hf_backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling(v): k for k, v in PIL_FILTERS.items()})
        mp.setattr(hf_backends, "is_torchvision_greater_or_equal", lambda version: True)  # Lanczos on the CPU
        yield stand_in


def _video_config(video_size, max_frames=6, fps=2):
    return {"video_processor_type": "SmolVLMVideoProcessor", "resample": 1, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "max_image_size": {"longest_edge": TILE},
            "video_sampling": {"fps": fps, "max_frames": max_frames, "video_size": {"longest_edge": video_size}}}


class HFProcessor(transformers.SmolVLMProcessor):
    def check_argument_for_proper_class(self, name, arg):  # the auto-class registry lacks video processors here
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def _processors(path, video_size):
    (path / "video_preprocessor_config.json").write_text(json.dumps(_video_config(video_size)))
    theirs = HFProcessor(
        image_processor=transformers.SmolVLMImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        video_processor=HFVideoProcessor.from_pretrained(path),
        image_seq_len=json.loads((path / "processor_config.json").read_text())["image_seq_len"],
        chat_template=(path / "chat_template.jinja").read_text(),
    )
    return SmolVLMProcessor.from_pretrained(path), theirs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("smolvlm_video"))


@pytest.fixture(scope="module")
def processors(checkpoint, torchvision_stand_in):
    return _processors(checkpoint, video_size=2 * TILE)


def _frames(t, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _compare(ours, theirs, texts, videos, metadata, **options):
    got = ours(texts, videos=videos, video_metadata=metadata, **options)
    want = theirs(text=texts, videos=videos, video_metadata=metadata, return_tensors="pt", padding=True, **options)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    for key, value in got.items():
        assert value.dtype == want[key].dtype, key
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    return got


def test_sampled_videos_of_different_lengths_and_sizes_match_transformers(processors):
    ours, theirs = processors
    texts = ours.apply_chat_template(
        [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
         [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "video"}]}]],
        add_generation_prompt=True)
    # 40 frames at 10 fps (4 s: 8 wanted at 2 fps, 6 at most) and 5 frames at 2 fps (5 kept)
    videos = [_frames(40, 50, 70, 1), _frames(5, 30, 20, 2)]
    metadata = [{"fps": 10, "total_num_frames": 40, "duration": 4.0},
                {"fps": 2, "total_num_frames": 5, "duration": 2.5}]
    got = _compare(ours, theirs, texts, videos, metadata, do_sample_frames=True)
    assert got["pixel_values"].shape == (2, 6, 3, TILE, TILE)
    assert (got["pixel_values"][1, 5] == 0).all()  # the shorter video's padding frame
    prompt = ours.decode(got["input_ids"][0], skip_special_tokens=False)
    assert "series of six frames from a 0:00:04 [H:MM:SS] video" in prompt and "Frame from 00:03:" in prompt


def test_long_video_skips_its_first_and_last_second(processors):
    ours, theirs = processors
    video = _frames(300, 12, 18, 3)  # 30 s at 10 fps: 6 frames at 2 fps between 1 s and 29 s
    got = _compare(ours, theirs, ["User:<video>Summarise."], [video],
                   [{"fps": 10, "total_num_frames": 300, "duration": 30.0}], do_sample_frames=True)
    assert "Frame from 00:01:" in ours.decode(got["input_ids"][0], skip_special_tokens=False)


def test_unsampled_frames_without_metadata_match_transformers(processors):
    """No metadata: transformers takes 24 fps for the timestamps; PIL frames and a (T, H, W, 3)
    array; a one-frame video; several frame counts in one batch."""
    ours, theirs = processors
    pil = [Image.fromarray(f) for f in _frames(3, 40, 40, 4)]
    texts = ["User:<video>One.", "User: two <video>", "User:<video>"]
    videos = [pil, _frames(7, 33, 61, 5), _frames(1, 64, 32, 6)]
    got = _compare(ours, theirs, texts, videos, None)
    assert got["pixel_values"].shape[1] == 7


def test_frames_picked_from_a_longer_video_match_transformers(processors):
    """Frames already chosen by the caller: their frames_indices and the original video's fps,
    frame count and duration give the timestamps."""
    ours, theirs = processors
    metadata = [{"fps": 30, "total_num_frames": 3000, "duration": 100.0, "frames_indices": [0, 900, 1800, 2999]}]
    got = _compare(ours, theirs, ["User:<video>What happens?"], [_frames(4, 24, 40, 16)], metadata)
    prompt = ours.decode(got["input_ids"][0], skip_special_tokens=False)
    assert "from a 0:01:40 [H:MM:SS] video" in prompt and "Frame from 01:39:" in prompt
    with pytest.raises(ValueError, match=r"video_metadata\[0\]: the frames are already picked"):
        ours("<video>", videos=_frames(4, 8, 8, 0), video_metadata=metadata, do_sample_frames=True)


def test_frames_at_tile_size_match_without_any_resize(checkpoint, torchvision_stand_in, tmp_path):
    """Frames of exactly the tile size with video_size = the tile: neither transformers nor
    vlmfast resizes, so the stand-in plays no part in the pixels."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    ours, theirs = _processors(tmp_path, video_size=TILE)
    before = torchvision_stand_in.size_changes
    _compare(ours, theirs, ["User:<video>A", "User:<video>B"], [_frames(20, TILE, TILE, 7), _frames(4, TILE, TILE, 8)],
             [{"fps": 4, "total_num_frames": 20, "duration": 5.0}, {"fps": 1, "total_num_frames": 4, "duration": 4.0}],
             do_sample_frames=True)
    assert torchvision_stand_in.size_changes == before


def test_chat_template_for_videos_matches_transformers(processors):
    ours, theirs = processors
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Because."}]},
                    {"role": "user", "content": "And then?"}]
    assert ours.apply_chat_template(conversation, add_generation_prompt=True) == \
        theirs.apply_chat_template(conversation, add_generation_prompt=True)


def test_frame_sampling_matches_transformers():
    hf = types.SimpleNamespace(num_frames=None, fps=None)
    for total, video_fps in [(1, 30), (7, 2), (40, 10), (95, 24), (300, 10), (1000, 30), (61, 7.5)]:
        for max_frames, fps in [(64, 1), (6, 2), (3, 0.5), (8, 24)]:
            duration = total / video_fps
            want = HFVideoProcessor.sample_frames(
                hf, HFVideoMetadata(total_num_frames=total, fps=video_fps, duration=duration),
                num_frames=max_frames, fps=fps)
            got = sample_frame_indices(VideoMetadata(total, video_fps, duration, list(range(total))),
                                       max_frames=max_frames, fps=fps)
            assert got.tolist() == want.tolist(), (total, video_fps, max_frames, fps)


def test_number_words_match_num2words():
    for n in [*range(0, 1200), 1999, 2000, 2001, 2100, 12345, 99999, 100000, 100001, 123456, 999999]:
        assert number_words(n) == num2words(n), n
    with pytest.raises(ValueError, match="n: expected an int"):
        number_words(10**6)


def test_a_folder_of_frames_is_the_same_video(processors, tmp_path):
    ours, _ = processors
    frames = _frames(4, 20, 30, 9)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame_{t:03d}.png")
    meta = [{"fps": 2}]
    from_folder = ours("User:<video>", videos=tmp_path, video_metadata=meta)
    from_array = ours("User:<video>", videos=frames, video_metadata=meta)
    assert all(torch.equal(from_folder[k], from_array[k]) for k in from_array)


def test_model_on_a_video_prompt_matches_transformers(checkpoint, processors):
    ours, theirs = processors
    model = SmolVLM.from_pretrained(checkpoint)
    hf = transformers.SmolVLMForConditionalGeneration.from_pretrained(checkpoint).eval()
    texts = ours.apply_chat_template(
        [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]] * 2,
        add_generation_prompt=True)
    inputs = ours(texts, videos=[_frames(30, 40, 56, 10), _frames(3, 24, 24, 11)],
                  video_metadata=[{"fps": 6}, {"fps": 1}], do_sample_frames=True)
    assert inputs["pixel_values"].shape[1] == 6  # 5 s at 2 fps, 6 at most; the second: 3 frames + 3 padding
    with torch.no_grad():
        expected = hf.double()(**{k: v.double() if k == "pixel_values" else v for k, v in inputs.items()}).logits
        actual = model(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"],
                       inputs["attention_mask"])
        hf.float()
        real = inputs["attention_mask"].bool()
        assert_close(actual[real], expected[real], name="logits")
        want = hf.generate(**inputs, do_sample=False, max_new_tokens=5)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5), want)


def test_bad_video_input_names_the_argument(processors):
    ours, _ = processors
    good = _frames(2, 16, 16, 0)
    with pytest.raises(ValueError, match=r"videos\[0\]: expected uint8 frames \(T, H, W, 3\)"):
        ours("<video>", videos=good.astype(np.float32))
    with pytest.raises(ValueError, match=r"videos\[0\]: expected uint8 frames \(T, H, W, 3\) with T >= 1"):
        ours("<video>", videos=good[..., :2])
    with pytest.raises(ValueError, match=r"videos\[0\]: expected frames of one size"):
        ours("<video>", videos=[good[0], _frames(1, 8, 16, 1)[0]])
    with pytest.raises(ValueError, match=r"videos\[0\]\[1\]: expected a uint8 \(H, W, 3\) frame"):
        ours("<video>", videos=[good[0], good[1, ..., 0]])
    with pytest.raises(ValueError, match=r"videos: expected one video per <video> of the texts \(\[1, 0\]"):
        ours(["<video>", "no video"], videos=[good, good])
    with pytest.raises(ValueError, match="videos: text has \\[1\\] <video> token"):
        ours("<video>")
    with pytest.raises(ValueError, match="images, videos: expected one of the two"):
        ours("<video>", images=[Image.new("RGB", (8, 8))], videos=good)
    with pytest.raises(ValueError, match="video_metadata: fps is needed to sample frames"):
        ours("<video>", videos=good, do_sample_frames=True)
    with pytest.raises(ValueError, match=r"video_metadata: expected one dict per video \(1\)"):
        ours("<video>", videos=good, video_metadata=[{"fps": 1}, {"fps": 2}])
    with pytest.raises(ValueError, match=r"video_metadata\[0\]: unknown keys \['speed'\]"):
        ours("<video>", videos=good, video_metadata={"speed": 2})
    with pytest.raises(ValueError, match=r"video_metadata\[0\]: fps expected a positive number"):
        ours("<video>", videos=good, video_metadata={"fps": 0})
    with pytest.raises(TypeError, match="videos: expected a video"):
        ours("<video>", videos=3)
    with pytest.raises(FileNotFoundError, match=r"videos\[0\]: expected a directory of frame images"):
        ours("<video>", videos="/nonexistent/frames")


def test_pipeline_takes_videos(checkpoint, processors):
    import vlmfast

    ours, _ = processors
    videos = [_frames(12, 30, 40, 12), [Image.fromarray(f) for f in _frames(2, 20, 20, 13)]]
    metadata = [{"fps": 4}, {"fps": 1}]
    pipe = vlmfast.pipeline("image-text-to-text", model=checkpoint, max_new_tokens=4, batch_size=1)
    answers = pipe(prompts=["What happens?", "Describe it."], videos=videos, video_metadata=metadata)
    model = SmolVLM.from_pretrained(checkpoint)
    for prompt, video, meta, answer in zip(["What happens?", "Describe it."], videos, metadata, answers):
        text = ours.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                      {"type": "text", "text": prompt}]}],
                                        add_generation_prompt=True)
        inputs = ours(text, videos=video, video_metadata=meta)
        new = model.generate(**inputs, max_new_tokens=4)[:, inputs["input_ids"].shape[1]:]
        assert answer == ours.batch_decode(new)[0].strip()
    with pytest.raises(ValueError, match=r"videos: expected a list of one video per prompt \(2\)"):
        pipe(prompts=["a", "b"], videos=[videos[0]])
    sampled = pipe(prompts="What happens?", videos=[videos[0]], video_metadata=[metadata[0]], do_sample_frames=True)
    text = ours.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    inputs = ours(text, videos=videos[0], video_metadata=metadata[0], do_sample_frames=True)
    assert inputs["pixel_values"].shape[1] == 6  # 3 s at 2 fps out of 12 frames
    new = model.generate(**inputs, max_new_tokens=4)[:, inputs["input_ids"].shape[1]:]
    assert sampled == [ours.batch_decode(new)[0].strip()]


def test_uint8_output_is_the_float_output_before_normalising(processors):
    """output="uint8" (for the model's fused normalisation): the same resized frames, channels
    last, and padding frames told by a 0 mask (their pixels are 0 like a black frame's)."""
    ours, _ = processors
    videos = [_frames(5, 30, 50, 14), _frames(2, 40, 40, 15)]
    as_float = ours.video_processor(videos)
    as_uint8 = ours.video_processor(videos, output="uint8")
    assert as_uint8.pixel_values.dtype == torch.uint8 and as_uint8.pixel_values.shape == (2, 5, TILE, TILE, 3)
    table = torch.from_numpy(ours.video_processor._table)  # (256, 3)
    rebuilt = torch.stack([table[:, c][as_uint8.pixel_values[..., c].long()] for c in range(3)], dim=2)
    assert torch.equal(rebuilt[:, :2], as_float.pixel_values[:, :2])
    assert torch.equal(rebuilt[0], as_float.pixel_values[0])
    assert as_uint8.pixel_attention_mask[1, 2:].sum() == 0 and as_float.pixel_attention_mask[1, 2:].all()
