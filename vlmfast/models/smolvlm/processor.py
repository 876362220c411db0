"""SmolVLM processor: chat template -> prompt text, <image> expanded from each image's tile grid,
tokenised with the checkpoint's tokenizer.json (`tokenizers` library, no transformers), batch
left-padded, images through the SmolVLM image processor.

    processor = SmolVLMProcessor.from_pretrained("path/to/SmolVLM2-256M-Video-Instruct")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    inputs = processor([text], [[image]])   # input_ids, attention_mask, pixel_values, pixel_attention_mask
    out = model.generate(**inputs, max_new_tokens=32)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

Videos (SmolVLM2) are sampled frames: `processor(text, videos=..., video_metadata=...)`, each
<video> of the text written out as transformers does (the frame count in words, the duration,
per frame its MM:SS timestamp and one unsplit image's tokens); see vlmfast.processing.video for
what a video may be.

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    inputs = processor([text], videos=[frames], video_metadata=[{"fps": 30}], do_sample_frames=True)

Equal to transformers' SmolVLMProcessor for the same checkpoint folder with padding_side "left"
(what batched generation needs); for videos up to the resampling of frames that need resizing
(vlmfast.processing.smolvlm_video).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vlmfast.processing.auto import image_processor_if_any
from vlmfast.processing.batch import is_image, nested_images
from vlmfast.processing.prompt_processor import PromptProcessor
from vlmfast.processing.smolvlm_prompt import (
    DEFAULT_VIDEO_FPS, FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, expand_image_tokens, video_prompt,
)
from vlmfast.processing.smolvlm_video import SmolVLMVideoProcessor
from vlmfast.processing.tokenizer_files import read_json
from vlmfast.processing.video import video_list

END_OF_UTTERANCE = "<end_of_utterance>"
DEFAULT_IMAGE_SEQ_LEN = 169  # transformers' SmolVLMProcessor default (Idefics3: 364 / 14 / 2 -> 13^2)
# The template transformers' SmolVLMProcessor renders a conversation with a video by (unless one
# is passed): messages as "Role: text", a ':' alone before a leading image or video, then
# <end_of_utterance>; "Assistant:" to prompt a reply.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _has_video(conversations) -> bool:
    return any(isinstance(part, dict) and part.get("type") == "video"
               for conversation in conversations if isinstance(conversation, (list, tuple))
               for message in conversation
               if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple))
               for part in message["content"])


def video_processor_from_pretrained(path: Path) -> SmolVLMVideoProcessor | None:
    """video_preprocessor_config.json, else preprocessor_config.json (where transformers looks),
    else None."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            return SmolVLMVideoProcessor(read_json(path / name))
    return None


def read_image_seq_len(path: Path) -> int:
    """Image tokens per tile: processor_config.json's image_seq_len (what transformers' processor
    uses), else derived from config.json (tile / patch)^2 / scale_factor^2, else transformers' default."""
    value = read_json(path / "processor_config.json").get("image_seq_len")
    if isinstance(value, int) and value > 0:
        return value
    model = read_json(path / "config.json")
    vision = model.get("vision_config", {})
    if "image_size" in vision and "patch_size" in vision:
        return (vision["image_size"] // vision["patch_size"]) ** 2 // model.get("scale_factor", 2) ** 2
    return DEFAULT_IMAGE_SEQ_LEN


class SmolVLMProcessor(PromptProcessor):
    """texts (+ images) -> the inputs of SmolVLM.forward / generate; token ids -> text.

    tokenizer: a `tokenizers.Tokenizer` holding <image>, <fake_token_around_image>, <global-img>,
    <row_r_col_c> and <end_of_utterance> as added tokens; image_processor: a SmolVLMImageProcessor
    (None: text only); image_seq_len: <image> tokens per tile; pad_token: the padding token's text.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor=None, *, image_seq_len: int = DEFAULT_IMAGE_SEQ_LEN,
                 chat_template: str | None = None, pad_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, padding_side: str = "left",
                 video_processor: SmolVLMVideoProcessor | None = None):
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len: expected a positive int, got {image_seq_len!r}")
        # bos/eos/pad/unk for the chat template, as transformers passes its special tokens map
        special_tokens = dict(special_tokens or {})
        super().__init__(tokenizer, image_processor, image_token=special_tokens.get("image_token", IMAGE_TOKEN),
                         chat_template=chat_template, pad_token=pad_token, special_tokens=special_tokens,
                         padding_side=padding_side)
        self.image_seq_len = image_seq_len
        self.fake_image_token = self.special_tokens.get("fake_image_token", FAKE_TOKEN)
        self.global_image_token = self.special_tokens.get("global_image_token", GLOBAL_TOKEN)
        self.end_of_utterance_token = self.special_tokens.get("end_of_utterance_token", END_OF_UTTERANCE)
        self.video_token = self.special_tokens.get("video_token", VIDEO_TOKEN)
        self.video_processor = video_processor
        self.end_of_utterance_id = tokenizer.token_to_id(self.end_of_utterance_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "left") -> "SmolVLMProcessor":
        """A checkpoint folder: tokenizer.json, tokenizer_config.json (special tokens), the chat
        template, preprocessor_config.json (images) and processor_config.json (image_seq_len)."""
        path = Path(path)
        text = cls.read_text_side(path)
        del text["image_token"]  # __init__ reads it from the special tokens
        return cls(image_processor=image_processor_if_any(path), image_seq_len=read_image_seq_len(path),
                   padding_side=padding_side, video_processor=video_processor_from_pretrained(path), **text)

    # ------------------------------------------------------------------ chat template

    def _chat_template_for(self, messages, chat_template: str | None) -> str | None:
        """The template of a conversation with a video, unless one is passed, is the one
        transformers' SmolVLMProcessor renders it by (VIDEO_CHAT_TEMPLATE)."""
        batched = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple))
        if chat_template is None and _has_video(messages if batched else [messages]):
            return VIDEO_CHAT_TEMPLATE
        return chat_template or self.chat_template

    # ------------------------------------------------------------------ encoding

    def __call__(self, text, images=None, videos=None, *, video_metadata=None, do_sample_frames: bool | None = None,
                 max_frames: int | None = None, fps: float | None = None) -> dict[str, torch.Tensor]:
        """text: a prompt or a list of B prompts, each with one `<image>` per image of its sample.
        images: None; one image; a list of images (one sample); a list of B lists (a sample may
        be empty), as transformers reads them.
        videos: instead of images, one video or a list of videos, one per `<video>` of the texts
        in order (vlmfast.processing.video: frames, a uint8 (T, H, W, 3) array or a frame
        directory); video_metadata: one dict per video ({"fps", "duration", ...}), needed for
        sampling and true timestamps (without fps a video counts as 24 fps, as in transformers).
        do_sample_frames, max_frames, fps: override the checkpoint's video sampling.
        A sample's pixel_values hold the frames of its videos in order.

        Returns dict:
            input_ids       int64 (B, L), left-padded with pad_token_id
            attention_mask  int64 (B, L), 0 on padding
            pixel_values    float32 (B, N, 3, H, W)   (only with images or videos; N: the most tiles
                            or frames of a sample, all-zero padding frames)
            pixel_attention_mask int64 (B, N, H, W)   (only with images or videos)
        """
        texts = self.texts(text)
        if videos is not None:
            if images is not None:
                raise ValueError("images, videos: expected one of the two per call (pixel_values hold either)")
            texts, out = self._videos(texts, videos, video_metadata, do_sample_frames, max_frames, fps)
        else:
            counts = [t.count(self.video_token) for t in texts]
            if any(counts):
                raise ValueError(f"videos: text has {counts} {self.video_token} token(s) per sample but no videos "
                                 "were given")
            texts, out = self._images(texts, images)
        input_ids, attention_mask = self.pad(self.encode(texts))
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def _images(self, texts, images):
        """texts with each <image> written out, and the image processor's outputs."""
        if images is None or (isinstance(images, (list, tuple)) and not is_image(images)
                              and all(isinstance(s, (list, tuple)) and not s for s in images)):
            counts = [t.count(self.image_token) for t in texts]
            if any(counts):
                raise ValueError(f"images: text has {counts} {self.image_token} token(s) per sample but no images "
                                 "were given")
            return texts, {}
        if self.image_processor is None:
            raise ValueError("images: this processor has no image processor (no preprocessor_config.json)")
        samples = nested_images(images)
        if len(samples) != len(texts):
            raise ValueError(f"images: expected one list of images per text ({len(texts)}), got {len(samples)} "
                             "(a flat list of images is ONE sample)")
        batch = self.image_processor(samples)
        texts = expand_image_tokens(texts, batch.rows, batch.cols, self.image_seq_len,
                                    fake_token=self.fake_image_token, image_token=self.image_token,
                                    global_token=self.global_image_token)
        return texts, batch.model_inputs()

    def _videos(self, texts, videos, video_metadata, do_sample_frames, max_frames, fps):
        """texts with each <video> written out, and the (B, N, ...) frames of each sample."""
        if self.video_processor is None:
            raise ValueError("videos: this processor has no video processor (no preprocessor_config.json)")
        videos = video_list(videos)
        counts = [t.count(self.video_token) for t in texts]
        if sum(counts) != len(videos):
            raise ValueError(f"videos: expected one video per {self.video_token} of the texts ({counts} per sample, "
                             f"{sum(counts)} in all), got {len(videos)}")
        if isinstance(video_metadata, dict):
            video_metadata = [video_metadata]
        batch = self.video_processor(videos, video_metadata, do_sample_frames=do_sample_frames,
                                     max_frames=max_frames, fps=fps)
        frame_count = batch.pixel_values.shape[1]  # transformers names the padded count in every prompt
        prompts = []
        for meta in batch.metadata:
            if meta.fps is None:
                meta.fps = DEFAULT_VIDEO_FPS
            prompts.append(video_prompt(frame_count, meta.timestamps, meta.duration, self.image_seq_len,
                                        fake_token=self.fake_image_token, image_token=self.image_token,
                                        global_token=self.global_image_token))
        prompts = iter(prompts)
        expanded = []
        for text in texts:
            pieces = text.split(self.video_token)
            expanded.append(pieces[0] + "".join(next(prompts) + piece for piece in pieces[1:]))

        if counts == [1] * len(texts):  # one video per sample: transformers' own layout
            return expanded, {"pixel_values": batch.pixel_values, "pixel_attention_mask": batch.pixel_attention_mask}
        # per sample: the real frames of its videos, in order, padded to the longest sample with
        # all-zero frames (mask 1 as transformers marks padding frames of a video)
        lengths = [len(meta.frames_indices) for meta in batch.metadata]
        owners = [b for b, c in enumerate(counts) for _ in range(c)]
        per_sample = [sum(n for n, o in zip(lengths, owners) if o == b) for b in range(len(texts))]
        N = max(per_sample)
        pixel_values = batch.pixel_values.new_zeros((len(texts), N, *batch.pixel_values.shape[2:]))
        pixel_mask = batch.pixel_attention_mask.new_ones((len(texts), N, *batch.pixel_attention_mask.shape[2:]))
        filled = [0] * len(texts)
        for v, (b, n) in enumerate(zip(owners, lengths)):
            pixel_values[b, filled[b]:filled[b] + n] = batch.pixel_values[v, :n]
            pixel_mask[b, filled[b]:filled[b] + n] = batch.pixel_attention_mask[v, :n]
            filled[b] += n
        return expanded, {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}
