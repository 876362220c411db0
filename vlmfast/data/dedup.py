"""Near-duplicate removal: pairs of perceptual hashes within a Hamming distance, image groups, keepers.

    pairs = find_duplicates(hashes, max_distance=4)     # [(i, j), ...], i < j
    result = dedup_folder("images/", max_distance=4)    # groups, what to keep, what to remove

The keeper of a group (KEEP_RULE) is the copy with the most pixels, then one in a lossless format
(PNG, BMP, TIFF, lossless WebP: a JPEG re-save of a PNG holds less, even when its file is larger),
then the larger file, then the first path in sorted order. Pixels come first because a lossless
thumbnail holds less of the picture than the full-size JPEG it was made from.

The pair search runs in C++ (csrc/cpu/hamming.cpp): for small distances a pigeonhole search
(split the 64 bits into max_distance + 1 bands; a pair within the distance agrees exactly on one
band, so only hashes sharing a band value are compared), else every pair in cache-sized tiles.
Without the extension, a chunked numpy search gives the same pairs.
"""

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlmfast import _extension
from vlmfast.data.phash import pack_bits, phash_bits

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
KEEP_RULE = "most pixels, then a lossless format over a palette (GIF) or lossy one (JPEG), then the larger file, " \
            "then the first path"
# Pillow format -> rank in the keeper rule: every pixel kept > a palette of 256 colours > lossy.
_LOSSLESS, _PALETTE, _LOSSY = 2, 1, 0
_FORMAT_RANK = {"PNG": _LOSSLESS, "BMP": _LOSSLESS, "TIFF": _LOSSLESS, "PPM": _LOSSLESS, "TGA": _LOSSLESS,
                "GIF": _PALETTE, "JPEG": _LOSSY, "MPO": _LOSSY, "WEBP": _LOSSY}
_MAX_INDEX = 2**31 - 1  # the kernel packs pair indices into 32 bits
_NUMPY_CHUNK = 2048


def as_hash_array(hashes) -> np.ndarray:
    """hashes -> (N,) contiguous uint64. Accepts ints in [0, 2^64), or a 1-D integer array/tensor
    (int64 values are read as their two's-complement bits, as torch stores 64-bit hashes)."""
    try:
        import torch

        if isinstance(hashes, torch.Tensor):
            hashes = hashes.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(hashes, np.ndarray):
        if hashes.ndim != 1:
            raise ValueError(f"hashes: expected a 1-D array (N,), got shape {hashes.shape}")
        if hashes.dtype == np.int64:
            return np.ascontiguousarray(hashes).view(np.uint64)
        if hashes.dtype.kind not in "ui":
            raise TypeError(f"hashes: expected an integer array, got {hashes.dtype}")
        if hashes.dtype.kind == "i" and hashes.size and hashes.min() < 0:
            raise ValueError("hashes: negative values in a narrow signed array; expected 64-bit hashes")
        return np.ascontiguousarray(hashes.astype(np.uint64))
    if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Sequence):
        raise TypeError(f"hashes: expected a list of ints or a 1-D integer array, got {type(hashes).__name__}")
    for i, value in enumerate(hashes):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**64:
            raise ValueError(f"hashes[{i}]: expected a 64-bit hash, an int in [0, 2**64), got {value!r}")
    return np.array([int(v) for v in hashes], dtype=np.uint64)


def _pairs_numpy(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """The same (P, 2) sorted pairs by brute force in chunks (the fallback without vlmfast._C)."""
    found = []
    for start in range(0, hashes.shape[0], _NUMPY_CHUNK):
        block = hashes[start : start + _NUMPY_CHUNK]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])
        i, j = np.nonzero(distance <= max_distance)
        i = i + start
        keep = j > i
        found.append(np.stack([i[keep], j[keep]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int64)


def find_duplicate_pairs(
    hashes, max_distance: int = 4, *, method: str = "auto", threads: int | None = None
) -> np.ndarray:
    """All pairs within `max_distance` as a (P, 2) int64 array of (i, j), i < j, sorted.

    hashes: N 64-bit hashes (see `as_hash_array`). max_distance: 0..64 bits.
    method: "auto" (banded search up to distance 10, else tiled), "banded", "all", or "numpy".
    """
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance: expected an int in [0, 64] (bits), got {max_distance!r}")
    if method not in ("auto", "banded", "all", "numpy"):
        raise ValueError(f"method: expected 'auto', 'banded', 'all' or 'numpy', got {method!r}")
    if method == "banded" and max_distance > 63:
        raise ValueError("method: 'banded' needs max_distance <= 63 (one band per allowed bit + 1)")
    hashes = as_hash_array(hashes)
    if hashes.shape[0] > _MAX_INDEX:
        raise ValueError(f"hashes: expected at most {_MAX_INDEX} hashes, got {hashes.shape[0]}")
    if hashes.shape[0] < 2:
        return np.empty((0, 2), dtype=np.int64)
    if method == "numpy" or _extension.load("_C") is None:
        if method != "numpy":
            _extension.warn_missing("_C", "numpy")
        return _pairs_numpy(hashes, int(max_distance))
    from vlmfast.native import hamming

    if max_distance == 64:
        method = "all"
    return hamming.hamming_pairs(hashes, int(max_distance), method=method, threads=threads)


def find_duplicates(hashes, max_distance: int = 4) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, whose hashes differ in at most `max_distance` bits, sorted.

    hashes: N 64-bit perceptual hashes (ints, or a uint64/int64 array or tensor).
    """
    return [(int(i), int(j)) for i, j in find_duplicate_pairs(hashes, max_distance)]


def group_pairs(n: int, pairs) -> list[list[int]]:
    """Connected components of size >= 2 of the graph on n items with the given edges, each
    sorted, ordered by their first item (union-find with path halving)."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for x in range(n):
        members.setdefault(root(x), []).append(x)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


@dataclasses.dataclass
class DedupResult:
    """What `dedup_folder` found. `groups` lists each group of near-duplicates with its keeper
    first; `keep` is every readable image minus `remove`; nothing on disk is changed."""

    root: Path
    max_distance: int
    keep: list[Path]
    remove: list[Path]
    groups: list[list[Path]]
    unreadable: list[Path]
    hashes: dict[Path, int]
    reasons: dict[Path, str] = dataclasses.field(default_factory=dict)  # why each unreadable file failed

    def to_json(self) -> str:
        rel = lambda p: str(p.relative_to(self.root))  # noqa: E731
        return json.dumps(
            {
                "root": str(self.root),
                "max_distance": self.max_distance,
                "keep_rule": KEEP_RULE,
                "num_images": len(self.keep) + len(self.remove),
                "num_keep": len(self.keep),
                "num_remove": len(self.remove),
                "groups": [[rel(p) for p in group] for group in self.groups],
                "remove": [rel(p) for p in self.remove],
                "unreadable": [{"path": rel(p), "reason": self.reasons.get(p, "cannot be decoded")}
                               for p in self.unreadable],
            },
            indent=2,
        )


def _edges(hashes: np.ndarray, max_distance: int, threads: int | None) -> np.ndarray:
    """Edges whose connected components are the near-duplicate groups, (E, 2) int64.

    Exact copies are common (the same file saved twice) and k copies would give k^2 / 2 pairs:
    search the distinct hashes only, then chain the copies of each hash to its first image.
    """
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    pairs = find_duplicate_pairs(unique, max_distance, threads=threads)
    copies = np.nonzero(first[inverse] != np.arange(hashes.shape[0]))[0]
    chain = np.stack([first[inverse[copies]], copies], axis=1)
    return np.concatenate([first[pairs].reshape(-1, 2), chain]).astype(np.int64)


def _image_files(root: Path, recursive: bool) -> list[Path]:
    walk = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in walk if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _format_rank(image, path: Path) -> int:
    rank = _FORMAT_RANK.get(image.format or "", _LOSSY)
    if image.format == "TIFF" and image.info.get("compression") in ("jpeg", "tiff_jpeg", "webp"):
        rank = _LOSSY
    if image.format == "WEBP":
        with open(path, "rb") as handle:  # RIFF header, then the first chunk: VP8L is lossless
            header = handle.read(16)
        rank = _LOSSLESS if header[12:16] == b"VP8L" else _LOSSY
    return rank


def _hash_and_size(path: Path):
    """(hash, width * height, lossless rank, bytes) of one image file, or the reason it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            bits = phash_bits(image)
            pixels = image.width * image.height
            rank = _format_rank(image, path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        from vlmfast.models.image_inputs import reason

        return reason(str(path), error)
    return pack_bits(bits), pixels, rank, path.stat().st_size


def dedup_folder(
    path, max_distance: int = 4, *, recursive: bool = True, threads: int | None = None, show_progress: bool = False,
    warn: bool = True,
) -> DedupResult:
    """Groups the near-duplicate images under `path` and picks one keeper per group.

    Images (by suffix: jpg, png, webp, ...) are hashed with `phash`; two images whose hashes are
    within `max_distance` bits are near-duplicates, and groups are the connected components.
    The keeper of a group follows KEEP_RULE (module docstring): most pixels, then a lossless
    format, then the larger file, then the first path in sorted order. Files that cannot be
    decoded are listed in `unreadable` (with `reasons`; a warning says so unless warn=False).
    show_progress: a bar on stderr while hashing (vlmfast.eval._progress).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path: expected a directory of images, got {os.fspath(path)!r} (not a directory)")
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance: expected an int in [0, 64] (bits), got {max_distance!r}")
    files = _image_files(root, recursive)
    if not files:
        raise ValueError(f"path: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {os.fspath(root)!r}")

    from concurrent.futures import ThreadPoolExecutor

    from vlmfast.eval._progress import Progress

    workers = threads or min(len(files), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            Progress(len(files), "hashing", unit="images", enabled=show_progress) as bar:
        info = []
        for item in pool.map(_hash_and_size, files):
            info.append(item)
            bar.update(1)
    reasons = {f: i for f, i in zip(files, info) if isinstance(i, str)}
    unreadable = list(reasons)
    if unreadable and warn:
        warnings.warn(f"dedup_folder: {len(unreadable)} file(s) could not be read as images, e.g. {unreadable[0]}", stacklevel=2)
    readable = [(f, i) for f, i in zip(files, info) if not isinstance(i, str)]
    paths = [f for f, _ in readable]
    hashes = np.array([i[0] for _, i in readable], dtype=np.uint64)

    groups, remove = [], []
    for members in group_pairs(len(paths), _edges(hashes, max_distance, threads)):
        # KEEP_RULE: most pixels, then lossless, then the larger file, then path order (members are path-sorted).
        ordered = sorted(members, key=lambda m: (-readable[m][1][1], -readable[m][1][2], -readable[m][1][3], m))
        groups.append([paths[m] for m in ordered])
        remove.extend(paths[m] for m in ordered[1:])
    removed = set(remove)
    return DedupResult(
        root=root,
        max_distance=max_distance,
        keep=[p for p in paths if p not in removed],
        remove=sorted(remove),
        groups=groups,
        unreadable=unreadable,
        hashes={p: int(h) for p, h in zip(paths, hashes)},
        reasons=reasons,
    )
