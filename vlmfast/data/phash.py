"""64-bit DCT perceptual hash, bit for bit the `imagehash` package's `phash` with its defaults.

grayscale ('L') -> 32 x 32 (Lanczos) -> 2D DCT-II (unnormalised, as scipy.fftpack.dct type 2 on
both axes) -> the top-left 8 x 8 coefficients -> 1 where a coefficient exceeds their median.
Bit 63 (the most significant) is coefficient (0, 0), then row-major: the integer whose hex form
is `str(imagehash.phash(image))`.
"""

import functools
import os

import numpy as np
from PIL import Image

HASH_SIZE = 8
SAMPLE_SIZE = 32  # HASH_SIZE x imagehash's highfreq_factor (4)
# MSB-first weights of the 64 bits: hash = sum(bit[k] << (63 - k)).
_BIT_WEIGHTS = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))


@functools.cache
def _dct_rows() -> np.ndarray:
    """(8, 32) float64: the first 8 rows of the unnormalised DCT-II matrix of size 32.

    DCT-II as scipy.fftpack defines it (norm=None): y[k] = 2 sum_n x[n] cos(pi k (2n + 1) / 2N).
    The 2D transform of X is D X D^T; only its 8 x 8 top-left corner is needed, so
    D[:8] X D[:8]^T.
    """
    k = np.arange(HASH_SIZE, dtype=np.float64)[:, None]
    n = np.arange(SAMPLE_SIZE, dtype=np.float64)[None, :]
    return 2.0 * np.cos(np.pi * k * (2.0 * n + 1.0) / (2.0 * SAMPLE_SIZE))


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        if image.dtype != np.uint8 or not channels_ok:
            raise ValueError(
                "image: expected a uint8 array (H, W), (H, W, 3) or (H, W, 4), "
                f"got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()  # decode now: the file closes on leaving the block
                return opened
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"image: cannot read {os.fspath(image)!r} as an image ({error})") from error
    raise TypeError(f"image: expected a PIL.Image.Image, a path or a uint8 array, got {type(image).__name__}")


def phash_bits(image) -> np.ndarray:
    """(8, 8) bool: the hash bits before packing (row-major = imagehash's hash array)."""
    gray = _open(image).convert("L").resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    d = _dct_rows()
    low = d @ pixels @ d.T
    return low > np.median(low)


def phash(image) -> int:
    """The 64-bit perceptual hash of an image (a PIL image, a path, or a uint8 (H, W[, C]) array
    as decoded) as a Python int.

    Equals `int(str(imagehash.phash(image)), 16)`. Near-identical images have hashes a small
    Hamming distance apart (see vlmfast.data.find_duplicates).
    """
    return pack_bits(phash_bits(image))


def pack_bits(bits: np.ndarray) -> int:
    """(8, 8) bool -> int, bits[0, 0] as the most significant bit (imagehash's hex order)."""
    return int(np.bitwise_or.reduce(_BIT_WEIGHTS[np.asarray(bits, dtype=bool).ravel()], initial=np.uint64(0)))


def phash_many(images, *, threads: int | None = None) -> np.ndarray:
    """(N,) uint64 hashes of many images (PIL images or paths), decoded on a thread pool
    (Pillow releases the GIL while it decodes and resizes)."""
    images = list(images)
    if threads is None:
        threads = min(len(images), os.cpu_count() or 1)
    if threads <= 1 or len(images) < 2:
        return np.array([phash(image) for image in images], dtype=np.uint64)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return np.fromiter(pool.map(phash, images), dtype=np.uint64, count=len(images))
