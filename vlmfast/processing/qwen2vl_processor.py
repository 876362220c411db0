"""Qwen2-VL / Qwen2.5-VL processor: chat template -> prompt text, each <|image_pad|> (and
<|video_pad|>) written out as many times as its image (video) has merged tokens, tokenised with
the checkpoint's tokenizer.json (`tokenizers`, no transformers), batch padded, images and videos
through the Qwen2-VL image / video processors.

    processor = Qwen2VLProcessor.from_pretrained("path/to/Qwen2-VL-2B-Instruct")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    inputs = processor([text], [[image]])  # input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
    out = model.generate(**inputs, max_new_tokens=32)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])

Equal to transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor (PIL image path, padding on the
left) for the same checkpoint folder; videos up to the resampling of frames that need resizing
(processing/qwen2vl_video.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vlmfast.processing.batch import is_image
from vlmfast.processing.prompt_processor import PromptProcessor
from vlmfast.processing.qwen2vl import Qwen2VLImageProcessor
from vlmfast.processing.qwen2vl_video import Qwen2VLVideoProcessor, sampled_fps
from vlmfast.processing.tokenizer_files import load_tokenizer, read_chat_template, read_json, read_special_tokens
from vlmfast.processing.video import video_list

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
END_OF_TURN = "<|im_end|>"


def _flat_images(images) -> list:
    """None, an image, a list of images (in prompt order) or one list per sample -> a flat list."""
    if images is None:
        return []
    if is_image(images):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected an image, a list of images or one list per prompt, got "
                        f"{type(images).__name__}")
    flat = []
    for i, item in enumerate(images):
        if isinstance(item, (list, tuple)):
            for j, image in enumerate(item):
                if not is_image(image):
                    raise TypeError(f"images[{i}][{j}]: expected a PIL image or a uint8 array, got "
                                    f"{type(image).__name__}")
            flat += list(item)
        elif is_image(item):
            flat.append(item)
        elif item is not None:
            raise TypeError(f"images[{i}]: expected an image or a list of images, got {type(item).__name__}")
    return flat


def expand_tokens(texts: list[str], token: str, counts: list[int]) -> list[str]:
    """Each occurrence of `token` (in order, across the texts) written out counts[k] times."""
    counts = iter(counts)
    out = []
    for text in texts:
        pieces = text.split(token)
        out.append(pieces[0] + "".join(token * next(counts) + piece for piece in pieces[1:]))
    return out


class Qwen2VLProcessor(PromptProcessor):
    """texts (+ images / videos) -> the inputs of Qwen2VL.forward / generate; ids -> text.

    tokenizer: a `tokenizers.Tokenizer` holding <|image_pad|> / <|video_pad|> as added tokens;
    version: "qwen2_vl" or "qwen2_5_vl" (2.5 adds second_per_grid_ts for videos). The chat
    template takes Qwen2-VL's variables (apply_chat_template(..., add_vision_id=True))."""

    def __init__(self, tokenizer: Tokenizer, image_processor: Qwen2VLImageProcessor | None = None,
                 video_processor: Qwen2VLVideoProcessor | None = None, *, chat_template: str | None = None,
                 pad_token: str | None = None, special_tokens: dict[str, str] | None = None,
                 padding_side: str = "left", version: str = "qwen2_vl"):
        if version not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"version: expected 'qwen2_vl' or 'qwen2_5_vl', got {version!r}")
        special_tokens = dict(special_tokens or {})
        super().__init__(tokenizer, image_processor or Qwen2VLImageProcessor(),
                         image_token=special_tokens.get("image_token", IMAGE_TOKEN), chat_template=chat_template,
                         pad_token=pad_token, special_tokens=special_tokens, padding_side=padding_side)
        self.video_processor = video_processor
        self.version = version
        self.video_token = self.special_tokens.get("video_token", VIDEO_TOKEN)
        self.video_token_id = tokenizer.token_to_id(self.video_token)
        # what closes a chat turn (the answers fine-tuning learns end with it)
        self.end_of_utterance_token = END_OF_TURN if tokenizer.token_to_id(END_OF_TURN) is not None \
            else self.special_tokens.get("eos_token")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "left") -> "Qwen2VLProcessor":
        """A checkpoint folder: tokenizer.json, tokenizer_config.json (special tokens), the chat
        template, preprocessor_config.json (images) and video_preprocessor_config.json (videos;
        else preprocessor_config.json, as transformers reads it)."""
        path = Path(path)
        tokenizer = load_tokenizer(path)
        special = read_special_tokens(path)
        images = read_json(path / "preprocessor_config.json")
        videos = read_json(path / "video_preprocessor_config.json") or images
        model_type = read_json(path / "config.json").get("model_type")
        named = images.get("processor_class") or read_json(path / "processor_config.json").get("processor_class")
        version = model_type if model_type in ("qwen2_vl", "qwen2_5_vl") else \
            ("qwen2_5_vl" if named == "Qwen2_5_VLProcessor" else "qwen2_vl")
        return cls(tokenizer, Qwen2VLImageProcessor(images), Qwen2VLVideoProcessor(videos),
                   chat_template=read_chat_template(path), pad_token=special.get("pad_token"),
                   special_tokens=special, padding_side=padding_side, version=version)

    def __call__(self, text, images=None, videos=None, *, video_metadata=None, do_sample_frames: bool | None = None,
                 fps: float | None = None, num_frames: int | None = None) -> dict[str, torch.Tensor]:
        """text: a prompt or a list of B prompts; each <|image_pad|> / <|video_pad|> stands for
        the next image / video. images: None, an image, a list of images (in prompt order across
        the batch) or one list per prompt (may be empty). videos: a video or a list of videos
        (vlmfast.processing.video); video_metadata: one dict per video ({"fps", ...}).

        Returns dict:
            input_ids          int64 (B, L), padded with pad_token_id (left by default)
            attention_mask     int64 (B, L)
            mm_token_type_ids  int64 (B, L): 1 on image tokens, 2 on video tokens, else 0
            pixel_values       float32 (sum of h * w patches, C * tp * p * p), image_grid_thw int64 (n, 3)
            pixel_values_videos, video_grid_thw (with videos); second_per_grid_ts float32 (V,) (2.5)
        """
        texts, out = self.texts(text), {}
        flat = _flat_images(images)
        slots = sum(t.count(self.image_token) for t in texts)
        if slots != len(flat):
            raise ValueError(f"images: the texts have {slots} {self.image_token} slot(s) in all, got {len(flat)} "
                             "image(s)")
        if flat:
            batch = self.image_processor(flat)
            merge = self.image_processor.merge_size**2
            texts = expand_tokens(texts, self.image_token, (batch.image_grid_thw.prod(-1) // merge).tolist())
            out.update(batch.model_inputs())
        video_slots = sum(t.count(self.video_token) for t in texts)
        clips = [] if videos is None else video_list(videos)
        if video_slots != len(clips):
            raise ValueError(f"videos: the texts have {video_slots} {self.video_token} slot(s) in all, got "
                             f"{len(clips)} video(s)")
        if clips:
            if self.video_processor is None:
                raise ValueError("videos: this processor has no video processor")
            if isinstance(video_metadata, dict):
                video_metadata = [video_metadata]
            batch = self.video_processor(clips, video_metadata, do_sample_frames=do_sample_frames, fps=fps,
                                         num_frames=num_frames)
            merge = self.video_processor.merge_size**2
            texts = expand_tokens(texts, self.video_token, (batch.video_grid_thw.prod(-1) // merge).tolist())
            out.update(batch.model_inputs())
            if self.version == "qwen2_5_vl":
                tp = self.video_processor.temporal_patch_size
                out["second_per_grid_ts"] = torch.tensor([tp / sampled_fps(m) for m in batch.metadata])
        input_ids, attention_mask = self.pad(self.encode(texts))
        types = torch.zeros_like(input_ids)
        types[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = 2
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types, **out}
