"""What `--images` names: a folder (searched recursively), a text file listing image paths, or
one image file; and each input's identity on disk, so that a rerun can tell a changed file.

    inputs = resolve_images("photos/")            # list[str], sorted
    inputs = resolve_images("list.txt")           # relative lines read against list.txt's folder
    inputs = resolve_images("cat.png")            # ["cat.png"]
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def resolve_images(images, *, flag: str = "--images") -> list[str]:
    """The image paths `images` names, as strings, in a fixed order:
    - a folder: every file with an image suffix under it, sorted;
    - a file with an image suffix: that one image;
    - any other file: a UTF-8 list, one path per line (blank lines and lines starting with #
      skipped), relative paths read against the list's own folder, in the list's order.
    ValueError naming `flag` when it names nothing, when the list is not text or is empty, or when
    a folder holds no images."""
    source = Path(images)
    if source.is_dir():
        found = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise ValueError(f"{flag}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under the folder {images}")
        return found
    if not source.exists():
        raise FileNotFoundError(f"{flag}: no such file or folder: {images}")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [str(source)]
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {images} is neither an image file (by its suffix: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}) nor a UTF-8 list of image paths") from None
    folder = source.parent
    found = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            found.append(entry if os.path.isabs(entry) else str(folder / entry))
    if not found:
        raise ValueError(f"{flag}: the list {images} names no images (one path per line)")
    duplicates = len(found) - len(set(found))
    if duplicates:
        first = next(p for i, p in enumerate(found) if p in found[:i])
        raise ValueError(f"{flag}: the list {images} names {duplicates} image(s) more than once, e.g. {first}")
    return found


def identity(path: str) -> dict:
    """{"path", "size", "mtime_ns"} of a file as it is now (size -1 when it is missing): enough to
    see that a file was replaced or edited between two runs without reading it again."""
    try:
        stat = os.stat(path)
    except OSError:
        return {"path": path, "size": -1, "mtime_ns": 0}
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def reason(path: str, error: Exception) -> str:
    """Why `path` could not be loaded, in words that do not repeat the path (the caller names it
    once: "skipped <path>: <reason>")."""
    from PIL import UnidentifiedImageError

    cause = error.__cause__ or error
    if isinstance(cause, FileNotFoundError):
        return "no such file"
    if isinstance(cause, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(cause, PermissionError):
        return "permission denied"
    if isinstance(cause, UnidentifiedImageError):
        return "not an image file Pillow can read"
    text = str(error).removeprefix(f"{path}: ")
    return text.replace(f"'{path}'", "the file").replace(path, "the file")


def read_images(paths: list[str], *, max_workers: int | None = None):
    """Decodes `paths` (threads; upright RGB, as vlmfast.processing.load_image) ->
    (paths read, their PIL images, [(path, reason)] of those that could not be read), in input order."""
    from concurrent.futures import ThreadPoolExecutor

    from vlmfast.processing import load_image

    def attempt(path):
        try:
            return load_image(path), None
        except ValueError as error:
            return None, reason(path, error)

    workers = max_workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(paths) == 1:
        outcomes = [attempt(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = list(pool.map(attempt, paths))
    done, images, failed = [], [], []
    for path, (image, why) in zip(paths, outcomes):
        if why is None:
            done.append(path)
            images.append(image)
        else:
            failed.append((path, why))
    return done, images, failed
