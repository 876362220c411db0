"""The built-in data set: coloured shapes drawn with Pillow, each with a caption.

Every sample is a pure function of (seed, index): random access, no files, the same pixels on
every machine. A class is a (colour, shape) pair ("red circle"); size, position, background and
a small colour jitter vary, and captions mention size and position in some of their templates so
that a model must pick the class words out of longer sentences.

    ds = SyntheticShapes(1000, image_size=32, seed=0)
    images, captions, labels = ds.batch(range(64))   # uint8 (64, 32, 32, 3), list[str], int64 (64,)
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.45, "large": 0.7}  # fraction of the image side
POSITIONS = {  # phrase -> centre (x, y) as fractions of the side
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
    "in the centre": (0.5, 0.5),
}
CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape} {position}",
    "a picture of a {colour} {shape}",
)
# Zero-shot prompts (ensembled): the class words in sentences like the training captions.
PROMPT_TEMPLATES = ("a {label}", "a picture of a {label}", "a small {label}", "a large {label}")

CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges without Pillow's antialiasing options


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    label: int  # index into CLASSES
    attributes: dict


def _draw(shape: str, colour, background, size: float, centre, image_size: int) -> np.ndarray:
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    r = size * side / 2
    cx, cy = centre[0] * side, centre[1] * side
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85  # the square's area comparable to the circle's
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    return np.asarray(img.resize((image_size, image_size), Image.BOX), dtype=np.uint8)


class SyntheticShapes:
    """`length` image-caption pairs; sample i is determined by (seed, i) alone."""

    classes = CLASSES
    prompt_templates = PROMPT_TEMPLATES

    def __init__(self, length: int, *, image_size: int = 32, seed: int = 0):
        if length < 1:
            raise ValueError(f"length: expected at least 1 sample, got {length}")
        if image_size < 8:
            raise ValueError(f"image_size: expected at least 8 pixels, got {image_size}")
        self.length, self.image_size, self.seed = length, image_size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index: expected 0 <= index < {self.length}, got {index}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(len(CLASSES)))
        colour_name, shape = CLASSES[label].split()
        size_name = str(rng.choice(list(SIZES)))
        position_name = str(rng.choice(list(POSITIONS)))
        jitter = rng.integers(-25, 26, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255))
        grey = int(rng.integers(60, 200))  # a neutral background: the colour word is the shape's
        background = tuple(int(v) for v in np.clip(grey + rng.integers(-10, 11, size=3), 0, 255))
        # centre moved a little so positions are regions, not points
        cx, cy = np.array(POSITIONS[position_name]) + rng.uniform(-0.03, 0.03, size=2)
        size = SIZES[size_name] * rng.uniform(0.95, 1.05)
        margin = size / 2
        centre = (float(np.clip(cx, margin, 1 - margin)), float(np.clip(cy, margin, 1 - margin)))
        image = _draw(shape, colour, background, size, centre, self.image_size)
        attributes = {"colour": colour_name, "shape": shape, "size": size_name, "position": position_name}
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        return Sample(image, template.format(**attributes), label, attributes)

    def batch(self, indices):
        """(uint8 (B, H, W, 3) numpy array, list of B captions, int64 (B,) labels)."""
        samples = [self[int(i)] for i in indices]
        images = np.stack([s.image for s in samples])
        return images, [s.caption for s in samples], np.array([s.label for s in samples], dtype=np.int64)


def caption_vocabulary() -> list[str]:
    """Every word a caption or zero-shot prompt can contain, sorted."""
    words = set()
    for text in CAPTION_TEMPLATES + PROMPT_TEMPLATES:
        words.update(w for w in text.split() if not w.startswith("{"))
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(SIZES)
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(words)
