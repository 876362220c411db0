"""load_image / load_images on files the tests write: EXIF rotation, alpha, CMYK, 16-bit, palette,
truncated and fake files, decompression bombs, skip mode, threads."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.processing.oracle import transformers
from tests.processing.synthetic import photo, with_alpha
from vlmfast.processing import DEFAULT_MAX_PIXELS, load_image, load_images


def hf_rgb(path) -> np.ndarray:
    """transformers' reading of a file: upright (as its load_image) and RGB with alpha on white (as
    its image processors' convert_to_rgb)."""
    from transformers.image_transforms import convert_to_rgb

    with Image.open(path) as image:
        return convert_to_rgb(ImageOps.exif_transpose(image), return_numpy=True)


def png_with_declared_size(path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header then claims width x height (CRC fixed), as a bomb would."""
    photo(1, 1).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))


def test_exif_rotated_jpeg_is_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = photo(40, 60, seed=1)  # stored 60 wide, 40 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 60)  # displayed 40 wide, 60 tall
    assert np.array_equal(np.asarray(loaded), hf_rgb(path))
    assert np.array_equal(np.asarray(loaded), np.asarray(transformers.image_utils.load_image(str(path))))


def test_png_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    image = with_alpha(photo(30, 50, seed=2))
    image.save(path)
    loaded = np.asarray(load_image(path))
    assert np.array_equal(loaded, hf_rgb(path))
    alpha = np.asarray(image)[..., 3]
    assert (loaded[alpha == 0] == 255).all()  # fully transparent -> white
    opaque = alpha == 255
    assert np.array_equal(loaded[opaque], np.asarray(image)[..., :3][opaque])


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "palette.gif"
    image = photo(20, 30, seed=3).convert("P")
    image.save(path, transparency=7)
    loaded = np.asarray(load_image(path))
    assert np.array_equal(loaded, hf_rgb(path))


@pytest.mark.parametrize("mode, suffix", [("CMYK", ".jpg"), ("L", ".png"), ("LA", ".png"), ("RGB", ".bmp")])
def test_other_modes_become_rgb_like_transformers(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    image = with_alpha(photo(25, 35, seed=4)).convert(mode)
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (35, 25)
    assert np.array_equal(np.asarray(loaded), hf_rgb(path))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    rng = np.random.default_rng(5)
    values = rng.integers(0, 65536, size=(17, 23), dtype=np.uint16)
    values[0, :4] = [0, 65535, 128, 129]  # the edges of the rounding
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    loaded = np.asarray(load_image(path))
    want = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(loaded, np.repeat(want[..., None], 3, axis=-1))
    # transformers' convert clips at 255 instead, which would make this image almost all white
    assert (hf_rgb(path) == 255).mean() > 0.9


def test_32_bit_integer_tiff(tmp_path):
    path = tmp_path / "deep.tif"
    values = np.array([[0, 257, 65535, 70000], [-5, 514, 1000, 30000]], dtype=np.int32)
    Image.fromarray(values).save(path)
    loaded = np.asarray(load_image(path))[..., 0]
    assert np.array_equal(loaded, np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.jpg"
    photo(64, 64, seed=6).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode"):
        load_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all\n")
    with pytest.raises(ValueError, match=r"notes\.jpg: cannot open as an image \(UnidentifiedImageError"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"absent\.png: cannot open as an image \(FileNotFoundError"):
        load_image(tmp_path / "absent.png")


def test_huge_dimension_header(tmp_path):
    # Over the limit by our own check (Pillow only warns below twice its limit).
    path = tmp_path / "bomb.png"
    png_with_declared_size(path, 10_000, 10_000)
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ValueError, match=rf"bomb\.png: 10000x10000 = 100000000 pixels exceeds max_pixels={DEFAULT_MAX_PIXELS}"):
            load_image(path)
    # Far over: Pillow refuses at open; still a ValueError naming the file.
    path = tmp_path / "huge.png"
    png_with_declared_size(path, 100_000, 100_000)
    with pytest.raises(ValueError, match=r"huge\.png: cannot open as an image \(DecompressionBombError"):
        load_image(path)


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    photo(40, 50).save(path)
    with pytest.raises(ValueError, match=r"small\.png: 50x40 = 2000 pixels exceeds max_pixels=1999"):
        load_image(path, max_pixels=1999)
    assert load_image(path, max_pixels=2000).size == (50, 40)
    assert load_image(path, max_pixels=None).size == (50, 40)


def bad_and_good_files(tmp_path):
    good = []
    for i in range(5):
        path = tmp_path / f"good{i}.png"
        photo(10 + i, 20 + i, seed=i).save(path)
        good.append(path)
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    cut = tmp_path / "cut.jpg"
    photo(64, 64).save(cut)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return [good[0], fake, good[1], good[2], cut, good[3], tmp_path / "missing.png", good[4]], good


def test_skip_mode_continues_and_reports(tmp_path):
    paths, good = bad_and_good_files(tmp_path)
    result = load_images(paths, on_error="skip", max_workers=3)
    assert result.paths == [str(p) for p in good]
    assert [image.size for image in result.images] == [(20 + i, 10 + i) for i in range(5)]
    for image, path in zip(result.images, good):
        assert np.array_equal(np.asarray(image), hf_rgb(path))
    assert [path for path, _ in result.failed] == [str(tmp_path / n) for n in ("fake.jpg", "cut.jpg", "missing.png")]
    assert "cannot open as an image" in result.failed[0][1] and "cannot decode" in result.failed[1][1]


def test_raise_mode_raises_the_first_bad_file(tmp_path):
    paths, _ = bad_and_good_files(tmp_path)
    with pytest.raises(ValueError, match=r"fake\.jpg: cannot open as an image"):
        load_images(paths)
    result = load_images(paths[:1] + paths[2:4], max_workers=1)
    assert len(result.images) == 3 and result.failed == []


def test_threads_keep_the_order(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.jpg"
        photo(8 + i, 8, seed=i).save(path)
        paths.append(path)
    threaded, serial = load_images(paths, max_workers=4), load_images(paths, max_workers=1)
    assert threaded.paths == serial.paths == [str(p) for p in paths]
    for a, b in zip(threaded.images, serial.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="paths: expected at least one path, got an empty list"):
        load_images([])
    with pytest.raises(TypeError, match="paths: expected a list of paths, got a single path"):
        load_images(str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match=r"on_error: expected one of \('raise', 'skip'\), got 'ignore'"):
        load_images([tmp_path / "a.png"], on_error="ignore")
    with pytest.raises(ValueError, match="max_pixels: expected None or a positive int, got 0"):
        load_images([tmp_path / "a.png"], max_pixels=0)
    with pytest.raises(ValueError, match="max_workers: expected None or a positive int, got 0"):
        load_images([tmp_path / "a.png"], max_workers=0)
