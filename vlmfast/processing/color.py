"""Turning any decoded image into 8-bit RGB, the way transformers' `convert_to_rgb` does.

Accepted inputs: a PIL image of any mode, or a uint8 array / tensor laid out (H, W), (H, W, 1),
(H, W, 3) or (H, W, 4) (channels last, as decoders produce and as `ops.patch_embed` takes).

Transparency is composited onto white, as transformers does (PIL images: `Image.alpha_composite`
on a white RGBA background; arrays: alpha * rgb + (1 - alpha) * 255 rounded). Every other mode goes
through Pillow's `convert("RGB")` (CMYK, palette, grayscale, YCbCr, ...), again as transformers does.

One deliberate difference: 16-bit and 32-bit integer grayscale ('I;16*', 'I', e.g. 16-bit PNGs)
is scaled to 8 bits (v * 255 / 65535, rounded). Pillow's convert("RGB"), and so transformers,
clips such values at 255, which turns almost every 16-bit photograph white.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def describe(image) -> str:
    if isinstance(image, Image.Image):
        return f"a PIL image of mode {image.mode!r}"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"an array of shape {tuple(image.shape)} and dtype {image.dtype}"
    return f"a {type(image).__name__}"


def as_uint8_array(image, name: str) -> np.ndarray:
    """A numpy uint8 view of an array or tensor image, (H, W) or (H, W, C); no colour change."""
    if isinstance(image, torch.Tensor):
        if image.device.type != "cpu":
            image = image.cpu()
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image or a uint8 array (H, W, C), got {describe(image)}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"{name}: expected uint8 pixels (H, W, C) as decoded, got dtype {image.dtype}; "
            "float images are not accepted because their range is ambiguous"
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"{name}: expected (H, W) or (H, W, C) with C in 1, 3 or 4 channels (channels last), "
            f"got {tuple(image.shape)}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: expected an image of at least 1x1 pixels, got {tuple(image.shape)}")
    return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    # 65535 = 255 * 257: dividing by 257 maps the 16-bit range exactly onto 0..255.
    eight_bit = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(eight_bit)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode 'RGB' (alpha composited onto white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def array_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    if channels == 1:
        return np.repeat(pixels, 3, axis=-1)
    if channels == 4:
        alpha = pixels[..., 3:4] / 255
        composite = alpha * pixels[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return pixels


def to_rgb(image, name: str = "image", *, convert: bool = True) -> Image.Image:
    """Any accepted image -> PIL 'RGB' image (uint8, 3 channels).

    With convert=False (a config's do_convert_rgb false) the image must already be 3-channel.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: expected an image of at least 1x1 pixels, got {image.width}x{image.height}")
        if convert:
            return pil_to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"{name}: do_convert_rgb is false, so expected an 'RGB' image, got mode {image.mode!r}")
        return image
    pixels = as_uint8_array(image, name)
    if convert:
        pixels = array_to_rgb(pixels)
    elif pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"{name}: do_convert_rgb is false, so expected (H, W, 3), got {tuple(pixels.shape)}")
    return Image.fromarray(np.ascontiguousarray(pixels))
