"""Pick the image processor a checkpoint's preprocessor_config.json names."""

from __future__ import annotations

import os
from pathlib import Path

from vlmfast.processing import config as cfg
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.blip_image import BlipImageProcessor
from vlmfast.processing.llava_image import LlavaImageProcessor
from vlmfast.processing.qwen2vl import Qwen2VLImageProcessor
from vlmfast.processing.resize_crop import CLIPImageProcessor, SiglipImageProcessor
from vlmfast.processing.smolvlm import Idefics3ImageProcessor, SmolVLMImageProcessor

# transformers' class names, without the "Fast" / "Pil" backend suffixes its files may carry.
PROCESSORS: dict[str, type[ImageProcessor]] = {
    "CLIPImageProcessor": CLIPImageProcessor,
    "SiglipImageProcessor": SiglipImageProcessor,
    "SmolVLMImageProcessor": SmolVLMImageProcessor,
    "Idefics3ImageProcessor": Idefics3ImageProcessor,
    "LlavaImageProcessor": LlavaImageProcessor,
    "BlipImageProcessor": BlipImageProcessor,
    "Qwen2VLImageProcessor": Qwen2VLImageProcessor,
}


def processor_class(name: str) -> type[ImageProcessor]:
    base = name
    for suffix in ("Fast", "Pil"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base not in PROCESSORS:
        raise ValueError(f"image_processor_type: unsupported {name!r}; supported: {sorted(PROCESSORS)}")
    return PROCESSORS[base]


def image_processor_from_pretrained(path: str | os.PathLike, **overrides) -> ImageProcessor:
    """The processor for a checkpoint directory (or a preprocessor_config.json), by its
    "image_processor_type"."""
    config = cfg.read_config(path)
    name = config.get("image_processor_type")
    if not isinstance(name, str):
        raise ValueError(f"image_processor_type: missing from {path!s}; use e.g. CLIPImageProcessor.from_pretrained")
    return processor_class(name)(config, **overrides)


def image_processor_if_any(path: str | os.PathLike) -> ImageProcessor | None:
    """The checkpoint directory's image processor, or None where it has no preprocessor_config.json
    (a text-only processor)."""
    if not (Path(path) / cfg.CONFIG_NAME).is_file():
        return None
    return image_processor_from_pretrained(path)
