"""CLIP and SigLIP image processors: resize, optional centre crop, rescale, normalise.

Equal to transformers' CLIPImageProcessorPil / SiglipImageProcessorPil (the "slow" PIL path, i.e.
CLIPImageProcessor(use_fast=False)) for the same config and images: resize with Pillow on uint8
(filter from the config's "resample"), crop on uint8 (zero padded if the image is smaller than the
crop), then the exact float32 rescale / normalise arithmetic (see pixels.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from vlmfast.processing import config as cfg
from vlmfast.processing import geometry
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.batch import ImageBatch, check_output, flat_images
from vlmfast.processing.color import to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class ResizeCropImageProcessor(ImageProcessor):
    """Images of any size -> one fixed size. size: {"shortest_edge"} (aspect kept),
    {"shortest_edge", "longest_edge"} or {"height", "width"}; crop_size: {"height", "width"}."""

    RESIZE_KEYS = (
        frozenset({"height", "width"}),
        frozenset({"shortest_edge"}),
        frozenset({"shortest_edge", "longest_edge"}),
    )

    def _configure(self, values: dict[str, Any]) -> None:
        square = cfg.flag("default_to_square", values["default_to_square"])
        self.size = cfg.size_dict("size", values["size"], default_to_square=square, allowed=self.RESIZE_KEYS)
        self.do_center_crop = cfg.flag("do_center_crop", values["do_center_crop"])
        self.crop_size = cfg.size_dict(
            "crop_size", values["crop_size"], default_to_square=True, allowed=(frozenset({"height", "width"}),)
        )
        if cfg.flag("do_pad", values["do_pad"]):
            raise ValueError(f"do_pad: padding to the largest image is not supported by {type(self).__name__}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after resize and crop."""
        if self.do_resize:
            height, width = self._resize_size(height, width)
        if self.do_center_crop:
            height, width = self.crop_size["height"], self.crop_size["width"]
        return height, width

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if "height" in size:
            return size["height"], size["width"]
        if "longest_edge" in size:
            return geometry.shortest_longest_edge_size(height, width, size["shortest_edge"], size["longest_edge"])
        return geometry.shortest_edge_size(height, width, size["shortest_edge"])

    def _uint8(self, indexed) -> np.ndarray:
        index, image = indexed
        image = to_rgb(image, f"images[{index}]", convert=self.do_convert_rgb)
        if self.do_resize:
            image = geometry.resize(image, self._resize_size(image.height, image.width), self.resample)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = geometry.center_crop(pixels, (self.crop_size["height"], self.crop_size["width"]))
        return pixels

    def __call__(self, images, *, output: str = "float32", max_workers: int | None = None) -> ImageBatch:
        """images: a PIL image, a uint8 array (H, W[, C]) or a list of them.

        Returns ImageBatch with pixel_values float32 (B, 3, H, W), or uint8 (B, H, W, 3) when
        output="uint8" (normalisation then belongs to ops.patch_embed, see patch_embed_normalization).
        max_workers: decode/resize on that many threads.
        """
        check_output(output)
        images = flat_images(images)
        frames = self._map(self._uint8, list(enumerate(images)), max_workers)
        shapes = {frame.shape for frame in frames}
        if len(shapes) > 1:
            raise ValueError(
                f"images: sizes differ after preprocessing {sorted(shapes)}; a batch needs one size "
                "(enable do_center_crop or use a {height, width} size)"
            )
        if output == "uint8":
            return ImageBatch(torch.from_numpy(np.ascontiguousarray(np.stack(frames))))
        height, width, channels = frames[0].shape
        pixel_values = np.empty((len(frames), channels, height, width), dtype=np.float32)
        for frame, out in zip(frames, pixel_values):
            self._to_float(frame, out)
        return ImageBatch(torch.from_numpy(pixel_values))


class CLIPImageProcessor(ResizeCropImageProcessor):
    """CLIP: short edge to 224 (bicubic), centre crop 224x224, OpenAI CLIP mean / std by default."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "default_to_square": False,
        "resample": 3,  # PIL.Image.Resampling.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "do_pad": False,
    }


class SiglipImageProcessor(ResizeCropImageProcessor):
    """SigLIP: resize to a square (filter from the config, bicubic by default), no crop, mean / std 0.5."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **CLIPImageProcessor.DEFAULTS,
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "image_mean": HALF,
        "image_std": HALF,
    }
