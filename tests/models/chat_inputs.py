"""Inputs the processor and pipeline tests of several families build alike: random RGB images and
user turns of a chat."""

import numpy as np
from PIL import Image


def random_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def user_turn(*parts) -> dict:
    """A user message; each part a text, or None for an image."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}
