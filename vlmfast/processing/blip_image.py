"""transformers' BlipImageProcessor (BLIP and BLIP-2): resize to a fixed square (bicubic by
default, 384 x 384), no crop, rescale, OpenAI CLIP mean / std."""

from __future__ import annotations

from typing import Any, ClassVar

from vlmfast.processing.resize_crop import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageProcessor


class BlipImageProcessor(CLIPImageProcessor):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CLIPImageProcessor.DEFAULTS,
        "size": {"height": 384, "width": 384},
        "default_to_square": True,
        "do_center_crop": False,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }
