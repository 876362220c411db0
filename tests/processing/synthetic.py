"""Photograph-like test images made on the spot: smooth gradients, sensor-like noise and shapes
with sharp edges (which is where resampling filters differ), reproducible from a seed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A PIL 'RGB' image of the given size."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, size=(1, 1, 3))
    base = 0.5 + 0.35 * np.sin(3.0 * x + 2.0 * y + phase) * np.cos(2.0 * y - x + phase / 2)
    noisy = base * 255 + rng.normal(0.0, 12.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], outline=colour, width=2)
    return image


def with_alpha(image: Image.Image, seed: int = 1) -> Image.Image:
    """The image with a varying alpha channel (fully transparent, opaque and partial areas)."""
    rng = np.random.default_rng(seed)
    h, w = image.height, image.width
    alpha = np.clip(np.linspace(-64, 320, w)[None, :] + rng.normal(0, 20, size=(h, w)), 0, 255).astype(np.uint8)
    rgba = np.dstack([np.asarray(image), alpha])
    return Image.fromarray(rgba)
