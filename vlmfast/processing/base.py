"""What every image processor shares: construction from a config file, validation, the pixel table."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

from vlmfast.processing import config as cfg
from vlmfast.processing.pixels import apply_table, patch_embed_normalization, value_table


class ImageProcessor:
    """Base class. Subclasses set DEFAULTS (transformers' class defaults for the same model) and
    implement __call__. Values come from DEFAULTS <- preprocessor_config.json <- keyword arguments.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides):
        unknown = sorted(set(overrides) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; known: {sorted(self.DEFAULTS)}")
        values = cfg.merged(self.DEFAULTS, config, overrides)
        self.do_convert_rgb = cfg.flag("do_convert_rgb", values["do_convert_rgb"])
        self.do_resize = cfg.flag("do_resize", values["do_resize"])
        self.resample = cfg.resample_filter(values["resample"])
        self.do_rescale = cfg.flag("do_rescale", values["do_rescale"])
        self.rescale_factor = cfg.positive_float("rescale_factor", values["rescale_factor"])
        self.do_normalize = cfg.flag("do_normalize", values["do_normalize"])
        self.image_mean = cfg.channel_values("image_mean", values["image_mean"])
        self.image_std = cfg.channel_values("image_std", values["image_std"])
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std: expected non-zero values, got {self.image_std}")
        self._configure(values)
        self._table = value_table(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )

    def _configure(self, values: dict[str, Any]) -> None:
        """Subclasses read and check their own keys here."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides):
        """From a checkpoint directory holding preprocessor_config.json (or that file's path)."""
        return cls(cfg.read_config(path), **overrides)

    def patch_embed_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) to pass to `ops.patch_embed` with output="uint8" pixel values, so that the
        fused op applies this config's rescale and normalise (up to float rounding)."""
        return patch_embed_normalization(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )

    @staticmethod
    def _map(function, items: list, max_workers: int | None) -> list:
        """function over items, on threads when asked (Pillow's resize releases the GIL)."""
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers: expected None or a positive int, got {max_workers!r}")
        if not max_workers or max_workers == 1 or len(items) < 2:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(function, items))

    def _to_float(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> rescaled, normalised float32 written into out (3, H, W)."""
        return apply_table(pixels, self._table, out)

    def _pad_frames(self, samples: list[list[np.ndarray]], output: str) -> tuple[np.ndarray, np.ndarray]:
        """Per row a list of uint8 (h, w, 3) frames (tiles or video frames) -> pixel_values float32
        (rows, count, 3, H, W) normalised, or uint8 (rows, count, H, W, 3) when output is "uint8",
        zero-padded to the largest frame and frame count; mask int64 (rows, count, H, W), 1 on the
        real pixels."""
        height = max(f.shape[0] for frames in samples for f in frames)
        width = max(f.shape[1] for frames in samples for f in frames)
        count = max(len(frames) for frames in samples)
        mask = np.zeros((len(samples), count, height, width), dtype=np.int64)
        if output == "uint8":
            pixel_values = np.zeros((len(samples), count, height, width, 3), dtype=np.uint8)
        else:
            pixel_values = np.zeros((len(samples), count, 3, height, width), dtype=np.float32)
        for row, frames in enumerate(samples):
            for n, frame in enumerate(frames):
                h, w = frame.shape[:2]
                mask[row, n, :h, :w] = 1
                if output == "uint8":
                    pixel_values[row, n, :h, :w] = frame
                else:
                    self._to_float(frame, pixel_values[row, n, :, :h, :w])
        return pixel_values, mask
