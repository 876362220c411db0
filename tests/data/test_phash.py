"""phash equals imagehash.phash bit for bit on generated images."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmfast.data import phash, phash_many
from vlmfast.data.phash import pack_bits, phash_bits

imagehash = pytest.importorskip("imagehash")


def _images(seed: int, count: int):
    """Noise, gradients, shapes on noise, odd sizes and modes (RGB, RGBA, L, P, I;16-free)."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        h, w = (int(v) for v in rng.integers(9, 260, size=2))
        kind = k % 5
        if kind == 0:
            array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            yield Image.fromarray(array)
        elif kind == 1:
            y, x = np.mgrid[0:h, 0:w]
            angle = rng.uniform(0, np.pi)
            ramp = (np.cos(angle) * x + np.sin(angle) * y) * rng.uniform(0.2, 3.0)
            noise = rng.normal(0, 8, size=(h, w))
            yield Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8), mode="L")
        elif kind == 2:
            image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            yield image
        elif kind == 3:
            yield Image.fromarray(rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8), mode="RGBA")
        else:
            yield Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert("P")


def _reference(image) -> int:
    return int(str(imagehash.phash(image)), 16)


@pytest.mark.parametrize("seed", [0, 1])
def test_phash_equals_imagehash(seed):
    for image in _images(seed, 60):
        assert phash(image) == _reference(image), (image.size, image.mode)


def test_bit_order_is_imagehash_hash_array():
    image = next(_images(3, 1))
    bits = phash_bits(image)
    assert np.array_equal(bits, imagehash.phash(image).hash)
    assert pack_bits(bits) == int("".join("1" if b else "0" for b in bits.ravel()), 2)


def test_paths_and_many(tmp_path):
    images = list(_images(4, 6))
    paths = []
    for k, image in enumerate(images):
        path = tmp_path / f"{k}.png"
        image.save(path)
        paths.append(path)
    expected = [_reference(Image.open(p)) for p in paths]
    assert [phash(p) for p in paths] == expected
    assert phash(str(paths[0])) == expected[0]
    assert phash(np.asarray(images[0])) == _reference(images[0])
    assert phash_many(paths, threads=2).tolist() == expected
    assert phash_many(paths, threads=1).dtype == np.uint64


def test_near_copies_are_close():
    image = next(_images(5, 1)).convert("RGB")
    resized = image.resize((image.width // 2 + 7, image.height // 2 + 3), Image.Resampling.BILINEAR)
    distance = bin(phash(image) ^ phash(resized)).count("1")
    assert distance <= 6


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="image: expected a PIL.Image.Image, a path or a uint8 array, got int"):
        phash(3)
    with pytest.raises(ValueError, match=r"image: expected a uint8 array \(H, W\), \(H, W, 3\) or \(H, W, 4\), got float64"):
        phash(np.zeros((4, 4)))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="image: cannot read .*notes.png"):
        phash(not_an_image)
    with pytest.raises(ValueError, match="image: cannot read .*missing.png"):
        phash(tmp_path / "missing.png")
