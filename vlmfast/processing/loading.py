"""Decoding image files for batch work: many files on threads, every one upright 8-bit RGB.

    result = load_images(paths, max_workers=8, on_error="skip")
    batch = processor(result.images)          # result.paths[i] is the file of result.images[i]
    for path, reason in result.failed: ...

Per file: Pillow reads the header first and the pixel count is checked against `max_pixels`
before any pixel is decoded (a small file can declare a 100000 x 100000 image); then the file is
decoded, turned upright by its EXIF orientation (ImageOps.exif_transpose, as transformers'
load_image does) and converted to RGB by color.pil_to_rgb (alpha onto white; CMYK, palette and
grayscale through Pillow; 16-bit grayscale scaled to 8 bits). Pillow's decoders release the GIL,
so threads decode in parallel.

Pillow's own guard (Image.MAX_IMAGE_PIXELS; an error above twice that) applies as well: a
max_pixels above it needs Image.MAX_IMAGE_PIXELS raised too. Every failure is a ValueError that
names the file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from vlmfast.processing.color import pil_to_rgb

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (about 0.25 GiB of RGBA)
ON_ERROR = ("raise", "skip")


@dataclass
class LoadedImages:
    """images[i] (PIL 'RGB') was read from paths[i]; failed lists (path, reason) of every file that
    could not be loaded, in input order (only with on_error="skip")."""

    images: list[Image.Image]
    paths: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One file -> upright PIL 'RGB' image. Raises ValueError naming the file when it cannot be read,
    is not a supported image, is truncated, or has more than max_pixels pixels (None: no limit)."""
    path = os.fspath(path)
    try:
        image = Image.open(path)
    except Exception as err:  # missing, unreadable, not an image, or over Pillow's own bomb limit
        raise ValueError(f"{path}: cannot open as an image ({type(err).__name__}: {err})") from err
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"{path}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                "(possible decompression bomb; raise max_pixels to allow it)"
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = pil_to_rgb(upright)
            rgb.load()
        except Exception as err:  # truncated data, bad EXIF, decoder errors
            raise ValueError(f"{path}: cannot decode ({type(err).__name__}: {err})") from err
    return rgb


def load_images(
    paths,
    *,
    max_workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_error: str = "raise",
) -> LoadedImages:
    """Decode `paths` (a list of str / PathLike) on `max_workers` threads (None: min(8, cpu count)).

    on_error="raise": the first bad file (in input order) raises its ValueError.
    on_error="skip": bad files are left out and listed in `failed`; the rest load.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("paths: expected a list of paths, got a single path; use load_image or [path]")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths: expected at least one path, got an empty list")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels: expected None or a positive int, got {max_pixels!r}")
    if max_workers is None:
        max_workers = min(8, os.cpu_count() or 1)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers: expected None or a positive int, got {max_workers!r}")

    def attempt(path: str):
        try:
            return load_image(path, max_pixels=max_pixels), None
        except ValueError as err:
            return None, err

    if max_workers == 1 or len(paths) == 1:
        outcomes = [attempt(path) for path in paths]
    else:
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            outcomes = list(pool.map(attempt, paths))

    result = LoadedImages([], [])
    for path, (image, error) in zip(paths, outcomes):
        if error is None:
            result.images.append(image)
            result.paths.append(path)
        elif on_error == "raise":
            raise error
        else:
            result.failed.append((path, str(error)))
    return result
