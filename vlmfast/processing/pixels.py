"""uint8 pixels -> float32 model input: rescale then normalise, bit-for-bit like transformers.

transformers computes, per pixel value v and channel c:
    x = float32(float64(v) * rescale_factor)          (image_transforms.rescale)
    y = (x - float32(mean[c])) / float32(std[c])       (image_transforms.normalize, float32 math)
A uint8 input has only 256 values per channel, so the whole pipeline is a (256, C) table computed
once with exactly these numpy steps; applying it is a gather, which is both exact and fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def value_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """float32 (256, C): the model input value of each uint8 value in each channel."""
    values = np.arange(256, dtype=np.uint8)[:, None].repeat(len(mean), axis=1)
    if do_rescale:
        table = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        table = values.astype(np.float32)
    if do_normalize:
        table = (table - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(table, dtype=np.float32)


def apply_table(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) through `table` (256, C) into float32 `out` (C, H, W)."""
    for channel in range(table.shape[1]):
        np.take(table[:, channel], pixels[..., channel], out=out[channel])
    return out


def patch_embed_normalization(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for `ops.patch_embed(images_uint8, weight, mean=, std=)`, which computes
    (v / 255 - mean) / std: the same map as this table, up to float rounding.

    (v * r - m) / s == (v / 255 - m / (255 r)) / (s / (255 r)), so any rescale factor r folds in.
    """
    scale = rescale_factor * 255 if do_rescale else 255.0
    mean = tuple(float(m) for m in mean) if do_normalize else (0.0,) * len(mean)
    std = tuple(float(s) for s in std) if do_normalize else (1.0,) * len(std)
    if abs(scale - 1) < 1e-12:  # the usual 1/255: hand the config's numbers over unchanged
        return mean, std
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)
