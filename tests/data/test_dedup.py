"""Pair search vs brute force, grouping, and dedup_folder end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.data import dedup_folder, find_duplicate_pairs, find_duplicates
from vlmfast.data.dedup import group_pairs

METHODS = ["auto", "banded", "all", "numpy"]


def _distances(hashes: np.ndarray) -> dict[tuple[int, int], int]:
    """Hamming distance of every pair i < j, with Python ints (independent of the kernels)."""
    values = [int(h) for h in hashes]
    return {
        (i, j): bin(values[i] ^ values[j]).count("1")
        for i in range(len(values))
        for j in range(i + 1, len(values))
    }


def _brute(hashes, max_distance: int, distances=None) -> list[tuple[int, int]]:
    distances = _distances(hashes) if distances is None else distances
    return [pair for pair, d in distances.items() if d <= max_distance]


def _hashes_with_near_pairs(n: int, seed: int, planted: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for _ in range(planted):
        source, target = rng.integers(0, n, size=2)
        value = int(hashes[source])
        for bit in rng.choice(64, size=int(rng.integers(0, 8)), replace=False):
            value ^= 1 << int(bit)
        hashes[target] = value
    hashes[: min(4, n)] = hashes[0]  # exact repeats
    return hashes


@pytest.mark.parametrize("n", [2, 3, 113, 700])
def test_pairs_match_brute_force(n):
    hashes = _hashes_with_near_pairs(n, seed=n, planted=n // 2)
    distances = _distances(hashes)
    for max_distance in (0, 1, 3, 4, 5, 7, 12):
        expected = _brute(hashes, max_distance, distances)
        for method in METHODS:
            got = find_duplicate_pairs(hashes, max_distance, method=method)
            assert got.dtype == np.int64 and got.shape[1] == 2
            assert [tuple(p) for p in got.tolist()] == expected, (method, max_distance)


@pytest.mark.parametrize("method", ["all", "numpy"])
def test_large_distances(method):
    hashes = _hashes_with_near_pairs(60, seed=7, planted=10)
    for max_distance in (30, 40, 64):
        got = find_duplicate_pairs(hashes, max_distance, method=method)
        assert [tuple(p) for p in got.tolist()] == _brute(hashes, max_distance)
    assert len(find_duplicate_pairs(hashes, 64)) == 60 * 59 // 2


def test_banded_is_exact_up_to_63_bits():
    hashes = _hashes_with_near_pairs(80, seed=8, planted=20)
    for max_distance in (20, 33, 63):
        got = find_duplicate_pairs(hashes, max_distance, method="banded")
        assert [tuple(p) for p in got.tolist()] == _brute(hashes, max_distance)


def test_threads_do_not_change_the_result():
    hashes = _hashes_with_near_pairs(3000, seed=9, planted=400)
    one = find_duplicate_pairs(hashes, 4, threads=1)
    assert np.array_equal(one, find_duplicate_pairs(hashes, 4, threads=2))
    assert np.array_equal(one, find_duplicate_pairs(hashes, 4, method="all", threads=2))


def test_numpy_fallback_without_the_extension(monkeypatch):
    from vlmfast.data import dedup

    class NoExtension:
        warned = []

        @staticmethod
        def load(name):
            return None

        @classmethod
        def warn_missing(cls, name, fallback):
            cls.warned.append((name, fallback))

    monkeypatch.setattr(dedup, "_extension", NoExtension)
    hashes = _hashes_with_near_pairs(200, seed=12, planted=50)
    got = find_duplicate_pairs(hashes, 4)
    assert [tuple(p) for p in got.tolist()] == _brute(hashes, 4)
    assert NoExtension.warned == [("_C", "numpy")]


def test_input_forms():
    hashes = [0, 1, 3, 2**64 - 1, 2**64 - 2, 7 << 40]
    expected = _brute(np.array(hashes, dtype=np.uint64), 2)
    assert find_duplicates(hashes, 2) == expected
    # torch has no uint64: int64 tensors carry the same bits in two's complement.
    as_int64 = torch.tensor(np.array(hashes, dtype=np.uint64).view(np.int64))
    assert find_duplicates(as_int64, 2) == expected
    assert find_duplicates(np.array(hashes, dtype=np.uint64), 2) == expected
    assert find_duplicates(np.array([5, 4], dtype=np.int32), 1) == [(0, 1)]
    assert find_duplicates([], 4) == [] and find_duplicates([12], 4) == []
    assert all(isinstance(i, int) for pair in find_duplicates(hashes, 2) for i in pair)


def test_bad_input():
    with pytest.raises(ValueError, match=r"max_distance: expected an int in \[0, 64\] \(bits\), got 65"):
        find_duplicates([1, 2], 65)
    with pytest.raises(ValueError, match=r"max_distance: expected an int in \[0, 64\]"):
        find_duplicates([1, 2], -1)
    with pytest.raises(ValueError, match=r"hashes\[1\]: expected a 64-bit hash, an int in \[0, 2\*\*64\), got -3"):
        find_duplicates([1, -3], 4)
    with pytest.raises(ValueError, match=r"hashes\[0\]: expected a 64-bit hash"):
        find_duplicates([2**64], 4)
    with pytest.raises(ValueError, match=r"hashes: expected a 1-D array \(N,\), got shape \(2, 2\)"):
        find_duplicates(np.zeros((2, 2), dtype=np.uint64), 4)
    with pytest.raises(TypeError, match="hashes: expected an integer array, got float64"):
        find_duplicates(np.zeros(3), 4)
    with pytest.raises(TypeError, match="hashes: expected a list of ints or a 1-D integer array, got str"):
        find_duplicates("abc", 4)
    with pytest.raises(ValueError, match="method: expected 'auto', 'banded', 'all' or 'numpy'"):
        find_duplicate_pairs([1, 2], 4, method="fast")


def test_groups_from_distinct_hashes_equal_groups_from_all_pairs():
    from vlmfast.data.dedup import _edges

    rng = np.random.default_rng(11)
    base = _hashes_with_near_pairs(40, seed=11, planted=15)
    hashes = base[rng.integers(0, 40, size=150)]  # many exact copies
    for max_distance in (0, 2, 4):
        expected = group_pairs(150, _brute(hashes, max_distance))
        assert group_pairs(150, _edges(hashes, max_distance, None)) == expected


def test_group_pairs():
    assert group_pairs(7, [(0, 3), (3, 5), (1, 2), (6, 5)]) == [[0, 3, 5, 6], [1, 2]]
    assert group_pairs(3, []) == []


# ----------------------------------------------------------------------------- dedup_folder


def _textured(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth random texture: low-frequency content survives resizing and JPEG, like photos.
    coarse = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def test_dedup_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    originals = [_textured(seed) for seed in range(5)]
    for k, image in enumerate(originals):
        image.save(tmp_path / f"img{k}.png")
    # Near copies: a smaller resize of img0 (keeper: the original, more pixels), a JPEG of img1
    # in a sub-folder and a larger upscale of img1 (keeper: the upscale), an exact copy of img2.
    originals[0].resize((48, 40), Image.Resampling.BILINEAR).save(tmp_path / "img0_small.png")
    originals[1].save(tmp_path / "sub" / "img1.jpg", quality=85)
    originals[1].resize((192, 160), Image.Resampling.BICUBIC).save(tmp_path / "img1_big.png")
    originals[2].save(tmp_path / "zz_copy_of_2.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")

    with pytest.warns(UserWarning, match="1 file\\(s\\) could not be read"):
        result = dedup_folder(tmp_path, max_distance=4)
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert [names(g) for g in result.groups] == [
        ["img0.png", "img0_small.png"],
        ["img1_big.png", "img1.png", "sub/img1.jpg"],
        ["img2.png", "zz_copy_of_2.png"],
    ]
    assert names(result.remove) == ["img0_small.png", "img1.png", "sub/img1.jpg", "zz_copy_of_2.png"]
    assert names(result.keep) == ["img0.png", "img1_big.png", "img2.png", "img3.png", "img4.png"]
    assert names(result.unreadable) == ["broken.jpg"]
    report = json.loads(result.to_json())
    assert report["num_images"] == 9 and report["num_remove"] == 4
    # Non-recursive: the sub-folder copy is not seen; distance 0 keeps only exact hash copies.
    with pytest.warns(UserWarning):
        flat = dedup_folder(tmp_path, max_distance=0, recursive=False)
    assert "sub/img1.jpg" not in names(flat.keep + flat.remove)
    assert [names(g) for g in flat.groups if "img2.png" in names(g)] == [["img2.png", "zz_copy_of_2.png"]]


def test_dedup_folder_bad_input(tmp_path):
    with pytest.raises(ValueError, match="path: expected a directory of images, got .*missing.*not a directory"):
        dedup_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="path: no image files .* found in"):
        dedup_folder(tmp_path)
    _textured(0).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"max_distance: expected an int in \[0, 64\]"):
        dedup_folder(tmp_path, max_distance=100)
