"""SmolVLM / Idefics3 image processor: resize by the longest edge, split into square tiles plus a
global image, pad the batch, report the tile grid.

Equal to transformers' SmolVLMImageProcessorPil / Idefics3ImageProcessorPil (use_fast=False) for
the same config and images. Per image, all on uint8 with Pillow (filter from "resample", Lanczos
for the real checkpoints):
  1. do_resize: long edge -> size["longest_edge"], short edge by the aspect ratio made even, then
     both kept under 4096 (geometry.smolvlm_resize_size).
  2. do_image_splitting: both edges rounded up to multiples of M = max_image_size["longest_edge"]
     (resized again), cut into rows x cols tiles of M x M in raster order, followed by the whole
     image resized to M x M (the global image). An image of exactly M x M is not split
     (rows = cols = 0, one frame).
     Without splitting: the image is resized to M x M, rows = cols = 0.
  3. rescale + normalise (pixels.py), then do_pad: every sample padded with all-zero frames to the
     largest frame count of the batch (and frames to the largest height / width; all frames are
     M x M in practice); pixel_attention_mask is 1 on real pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from vlmfast.processing import config as cfg
from vlmfast.processing import geometry
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.batch import ImageBatch, check_output, nested_images
from vlmfast.processing.color import to_rgb

HALF = (0.5, 0.5, 0.5)


class SmolVLMImageProcessor(ImageProcessor):
    """Defaults are transformers' class defaults (longest_edge 4 * 364, tiles of 364); the real
    SmolVLM2-256M preprocessor_config.json says longest_edge 2048, max_image_size 512, resample 1
    (Lanczos), mean = std = 0.5: load it with from_pretrained."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": 4 * 364},
        "resample": 1,  # PIL.Image.Resampling.LANCZOS
        "do_image_splitting": True,
        "max_image_size": {"longest_edge": 364},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": HALF,
        "image_std": HALF,
        "do_pad": True,
    }

    def _configure(self, values: dict[str, Any]) -> None:
        self.size = cfg.size_dict(
            "size",
            values["size"],
            default_to_square=True,
            allowed=(frozenset({"longest_edge"}), frozenset({"height", "width"})),
        )
        max_size = values["max_image_size"]
        if isinstance(max_size, int) and not isinstance(max_size, bool):
            max_size = {"longest_edge": max_size}
        self.max_image_size = cfg.size_dict(
            "max_image_size", max_size, default_to_square=True, allowed=(frozenset({"longest_edge"}),)
        )
        self.do_image_splitting = cfg.flag("do_image_splitting", values["do_image_splitting"])
        self.do_pad = cfg.flag("do_pad", values["do_pad"])

    @property
    def tile_size(self) -> int:
        return self.max_image_size["longest_edge"]

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        if "longest_edge" in self.size:
            return geometry.smolvlm_resize_size(height, width, self.size["longest_edge"])
        return self.size["height"], self.size["width"]

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of this size is split into; (0, 0) when it is not split."""
        if not self.do_image_splitting:
            return 0, 0
        if self.do_resize:
            height, width = self._resize_size(height, width)
        height, width = geometry.tile_multiple_size(height, width, self.tile_size)
        tile = self.tile_size
        if height > tile or width > tile:
            return (height - tile) // tile + 1, (width - tile) // tile + 1
        return 0, 0

    def _frames(self, item) -> tuple[list[np.ndarray], int, int]:
        """One image -> its uint8 (M, M, 3) frames (tiles then the global image), rows, cols."""
        name, image = item
        image = to_rgb(image, name, convert=self.do_convert_rgb)
        if self.do_resize:
            image = geometry.resize(image, self._resize_size(image.height, image.width), self.resample)
        tile = self.tile_size
        if not self.do_image_splitting:
            return [np.asarray(geometry.resize(image, (tile, tile), self.resample))], 0, 0
        image = geometry.resize(image, geometry.tile_multiple_size(image.height, image.width, tile), self.resample)
        if image.height <= tile and image.width <= tile:
            return [np.asarray(image)], 0, 0
        pixels = np.asarray(image)
        rows, cols = (image.height - tile) // tile + 1, (image.width - tile) // tile + 1
        frames = [pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
        frames.append(np.asarray(geometry.resize(image, (tile, tile), self.resample)))
        return frames, rows, cols

    def __call__(self, images, *, output: str = "float32", max_workers: int | None = None) -> ImageBatch:
        """images: one image (one sample), a list of images (ONE sample with several images, as in
        transformers) or a list of lists (one list per sample; a sample may be empty).

        Returns ImageBatch:
            pixel_values: float32 (B, N, 3, H, W), or uint8 (B, N, H, W, 3) with output="uint8";
                N = the largest frame count of a sample (tiles + global image, summed over its images).
            pixel_attention_mask: int64 (B, N, H, W) (None when do_pad is false).
            rows, cols: list (per sample) of lists (per image) of the tile grid.
        """
        check_output(output)
        samples = nested_images(images)
        items = [(f"images[{i}][{j}]", image) for i, sample in enumerate(samples) for j, image in enumerate(sample)]
        results = iter(self._map(self._frames, items, max_workers))
        sample_frames, rows, cols = [], [], []
        for sample in samples:
            frames, sample_rows, sample_cols = [], [], []
            for _ in sample:
                image_frames, r, c = next(results)
                frames += image_frames
                sample_rows.append(r)
                sample_cols.append(c)
            sample_frames.append(frames)
            rows.append(sample_rows)
            cols.append(sample_cols)

        all_frames = [frame for frames in sample_frames for frame in frames]
        if not self.do_pad and (
            len({len(frames) for frames in sample_frames}) > 1 or len({f.shape for f in all_frames}) > 1
        ):
            raise ValueError(
                "images: samples have different frame counts or sizes and do_pad is false; "
                f"frame counts {[len(f) for f in sample_frames]}"
            )
        pixel_values, mask = self._pad_frames(sample_frames, output)
        return ImageBatch(
            torch.from_numpy(pixel_values),
            torch.from_numpy(mask) if self.do_pad else None,
            rows,
            cols,
        )


class Idefics3ImageProcessor(SmolVLMImageProcessor):
    """Idefics3 uses the same algorithm and the same defaults as SmolVLM."""
