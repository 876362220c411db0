"""Qwen2-VL / Qwen2.5-VL image processor: each image at (about) its own resolution, cut into
flattened patches.

Equal to transformers' Qwen2VLImageProcessorPil (the PIL path) for the same config and images,
bit for bit. Per image:
  1. smart_resize: height and width rounded to multiples of factor = patch_size * merge_size,
     then scaled (aspect kept, as near as multiples allow) into [min_pixels, max_pixels];
     Pillow resize on uint8 with the config's filter (bicubic).
  2. rescale + normalise through the exact float32 table of pixels.py.
  3. patchify: frames of merge x merge blocks of patch x patch pixels, blocks in raster order;
     each patch flattened as (C, temporal_patch_size, p, p) with the one frame repeated over the
     temporal patch. Output rows: h * w patches (in patch units) per image, images one after
     another; image_grid_thw (1, h, w) per image.
The batch's pixel_values is (sum of h * w, C * tp * p * p) float32: no padding at any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from vlmfast.processing import geometry
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.batch import flat_images
from vlmfast.processing.color import to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer, thinner images


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, *, name: str = "image") -> tuple[int, int]:
    """(height, width) multiples of `factor` holding between min_pixels and max_pixels pixels,
    the aspect ratio kept as well as the multiples allow (transformers' arithmetic, step by step:
    round, then floor / ceil after scaling by sqrt of the pixel ratio). ValueError naming `name`
    for an aspect ratio above 200."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"{name}: aspect ratio {max(height, width) / min(height, width):.1f} of {height} x {width} "
                         f"pixels exceeds the processor's limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(values: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """values float32 (T, C, H, W), T frames (T a multiple of `temporal`) -> (T / temporal *
    H/p * W/p, C * temporal * p * p): per temporal patch, merge blocks in raster order, each
    block's patches row by row, each patch (C, temporal, p, p)."""
    frames, channels, height, width = values.shape
    gh, gw = height // patch, width // patch
    grid = values.reshape(frames // temporal, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    # (gt, tp, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tp, ph, pw)
    return grid.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, channels * temporal * patch * patch)


@dataclass
class Qwen2VLImageBatch:
    """pixel_values float32 (sum of h * w, C * tp * p * p); image_grid_thw int64 (n, 3)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


def pixel_limits(values: dict, name: str = "size") -> tuple[int, int]:
    """(min_pixels, max_pixels) as transformers reads them: size {"shortest_edge",
    "longest_edge"} (or {"min_pixels", "max_pixels"}), overridden by top-level min_pixels /
    max_pixels."""
    size = values.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"{name}: expected a dict {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}, "
                         f"got {size!r}")
    low = values.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
    high = values.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
    for key, value in (("min_pixels", low), ("max_pixels", high)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: expected a positive int (pixels), got {value!r}")
    if low > high:
        raise ValueError(f"min_pixels: {low} exceeds max_pixels {high}")
    return low, high


class Qwen2VLImageProcessor(ImageProcessor):
    """Defaults are transformers' (min 56 x 56, max 28 x 28 x 1280 pixels, bicubic, OpenAI CLIP
    mean / std, 14-pixel patches merged 2 x 2, temporal patch 2)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
        "min_pixels": None,
        "max_pixels": None,
        "resample": 3,  # PIL.Image.Resampling.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }

    def _configure(self, values: dict[str, Any]) -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive int, got {value!r}")
            setattr(self, key, value)
        self.min_pixels, self.max_pixels = pixel_limits(values)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int, name: str = "image") -> tuple[int, int]:
        """(height, width) after step 1 (the size itself when do_resize is off)."""
        if self.do_resize:
            return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, name=name)
        if height % self.factor or width % self.factor:
            raise ValueError(f"{name}: {height} x {width} pixels; with do_resize false both must be multiples of "
                             f"patch_size * merge_size = {self.factor}")
        return height, width

    def num_image_tokens(self, height: int, width: int) -> int:
        """Tokens an image of this size becomes in the prompt: h * w / merge_size^2 (patch units)."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def _uint8(self, indexed) -> np.ndarray:
        index, image = indexed
        name = f"images[{index}]"
        image = to_rgb(image, name, convert=self.do_convert_rgb)
        size = self.resized_size(image.height, image.width, name)
        if size != (image.height, image.width):
            image = geometry.resize(image, size, self.resample)
        return np.asarray(image)

    def __call__(self, images, *, max_workers: int | None = None) -> Qwen2VLImageBatch:
        """images: an image (PIL, uint8 (H, W[, C]) array) or a list of them (every image of a
        batch, in prompt order). Returns Qwen2VLImageBatch."""
        images = flat_images(images)
        frames = self._map(self._uint8, list(enumerate(images)), max_workers)
        patches, grids = [], []
        for pixels in frames:
            height, width = pixels.shape[:2]
            values = np.empty((1, 3, height, width), dtype=np.float32)
            self._to_float(pixels, values[0])
            # the one frame repeated over the temporal patch (a broadcast: no copy before the reshape)
            repeated = np.broadcast_to(values, (self.temporal_patch_size, 3, height, width))
            patches.append(patchify(repeated, self.patch_size, self.merge_size, self.temporal_patch_size))
            grids.append((1, height // self.patch_size, width // self.patch_size))
        pixel_values = torch.from_numpy(np.ascontiguousarray(np.concatenate(patches)))
        return Qwen2VLImageBatch(pixel_values, torch.tensor(grids, dtype=torch.int64))
