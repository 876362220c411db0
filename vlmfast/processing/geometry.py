"""Output sizes, resizing and cropping of uint8 RGB images, with transformers' exact arithmetic.

Sizes are (height, width). Every size rule below reproduces the float / int steps of the
corresponding transformers function (int() truncation, ceil, evenness fixes) because one pixel
of difference in a target size changes every output value.

Resizing goes through Pillow on 8-bit data, as transformers' PIL image processors do: they turn
the uint8 array back into a PIL image and call `Image.resize((w, h), resample, reducing_gap=None)`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# transformers' SmolVLM / Idefics3 processors never produce an edge beyond 4k.
SMOLVLM_MAX_IMAGE_SIZE = 4096


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """CLIP: the short edge becomes `shortest`, the long edge keeps the aspect ratio (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def shortest_longest_edge_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Short edge to `shortest` unless that pushes the long edge past `longest` (DETR-style rule)."""
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * shortest > longest:
        raw = longest * low / high
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(shortest * height / width)), shortest
    return shortest, (int(raw * width / height) if raw is not None else int(shortest * width / height))


def longest_edge_even_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SmolVLM step 1: the long edge becomes `longest`, the short edge is made even, at least 1."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def below_upper_bound_size(height: int, width: int, bound: int) -> tuple[int, int]:
    """SmolVLM step 2: shrink so that no edge exceeds `bound` (keeps the aspect ratio)."""
    aspect = width / height
    if width >= height and width > bound:
        width = bound
        height = int(width / aspect)
    elif height > width and height > bound:
        height = bound
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def smolvlm_resize_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The size SmolVLM / Idefics3 resize an image to for size={"longest_edge": longest}."""
    height, width = longest_edge_even_size(height, width, longest)
    return below_upper_bound_size(height, width, SMOLVLM_MAX_IMAGE_SIZE)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """SmolVLM step 3: both edges rounded up to multiples of the tile edge `tile`.

    The long edge is rounded first; the short edge is recomputed from it through the aspect
    ratio and then rounded, exactly as transformers' resize_for_vision_encoder.
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Pillow resize of an 8-bit image to (height, width)."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"resize: target size must be at least 1x1, got {height}x{width}")
    return image.resize((width, height), resample=resample, reducing_gap=None)


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (h, w, C) from the centre; an image smaller than the crop is padded with 0.

    Offsets as transformers: top = (H - h) // 2 when the crop fits; when it does not, the image
    is first placed in a zero canvas at ceil((h - H) / 2), then cropped from there.
    """
    height, width = pixels.shape[:2]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    canvas_h, canvas_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((canvas_h - height) / 2), math.ceil((canvas_w - width) / 2)
    canvas = np.zeros((canvas_h, canvas_w) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(canvas_h, top + crop_h), max(0, left) : min(canvas_w, left + crop_w)]
