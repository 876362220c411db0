"""What the image processors return, and how they read their `images` argument."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

OUTPUT_MODES = ("float32", "uint8")


@dataclass
class ImageBatch:
    """Processed images.

    pixel_values:
        output="float32": float32 (B, C, H, W) (SmolVLM: (B, N, C, H, W)), equal to transformers'
        pixel_values.
        output="uint8": uint8 (B, H, W, C) (SmolVLM: (B, N, H, W, C)) after resize / crop / tiling,
        before rescale and normalise, for `ops.patch_embed(pixel_values, weight, mean=, std=)`
        with `mean, std = processor.patch_embed_normalization()`.
    pixel_attention_mask: SmolVLM only: int64 (B, N, H, W), 1 on real pixels, 0 on padding
        (padded slots of samples with fewer tiles are all 0).
    rows, cols: SmolVLM only: per sample, per image, the tile grid (0, 0 when not split); the
        prompt needs them to place the image tokens.
    """

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor | None = None
    rows: list[list[int]] | None = field(default=None)
    cols: list[list[int]] | None = field(default=None)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors a model's forward takes, by name (pixel_values, pixel_attention_mask)."""
        inputs = {"pixel_values": self.pixel_values}
        if self.pixel_attention_mask is not None:
            inputs["pixel_attention_mask"] = self.pixel_attention_mask
        return inputs


def is_image(value) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, torch.Tensor))


def check_output(output: str) -> str:
    if output not in OUTPUT_MODES:
        raise ValueError(f"output: expected one of {OUTPUT_MODES}, got {output!r}")
    return output


def flat_images(images) -> list:
    """A single image or a list of images -> a non-empty list of images."""
    if is_image(images):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected an image or a list of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    for index, image in enumerate(images):
        if not is_image(image):
            raise TypeError(
                f"images[{index}]: expected a PIL image or a uint8 array (H, W, C), got {type(image).__name__}"
            )
    return list(images)


def nested_images(images) -> list[list]:
    """SmolVLM's reading, as transformers' make_nested_list_of_images: a single image is one sample
    with one image; a flat list is ONE sample with several images; a list of lists is one list per
    sample (a sample may have no image)."""
    if is_image(images):
        return [[images]]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected an image, a list of images or a list of lists, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    if all(isinstance(sample, (list, tuple)) for sample in images):
        samples = [list(sample) for sample in images]
    elif all(is_image(image) for image in images):
        samples = [list(images)]
    else:
        raise TypeError("images: expected a list of images or a list of lists of images, not a mix")
    for i, sample in enumerate(samples):
        for j, image in enumerate(sample):
            if not is_image(image):
                raise TypeError(
                    f"images[{i}][{j}]: expected a PIL image or a uint8 array (H, W, C), got {type(image).__name__}"
                )
    if not any(samples):
        raise ValueError("images: expected at least one image, got only empty samples")
    return samples
