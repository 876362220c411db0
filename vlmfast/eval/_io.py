"""Reading the evaluation files: JSON and image errors name the file, the entry and the field."""

import json
import os
from pathlib import Path

from PIL import Image


class JsonFile:
    """A parsed JSON file that words its errors as `<role> file <path>: <where>: <problem>`."""

    def __init__(self, path, role: str):
        self.path = Path(path)
        self.role = role
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"{role}: file not found: {os.fspath(path)!r}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{role}: cannot read {os.fspath(path)!r} ({error})") from None
        try:
            self.data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{role} file {os.fspath(path)!r}: malformed JSON at line {error.lineno} "
                f"column {error.colno}: {error.msg}"
            ) from None

    def error(self, where: str, problem: str) -> ValueError:
        return ValueError(f"{self.role} file {os.fspath(self.path)!r}: {where}: {problem}")

    def field(self, obj, key: str, where: str, kind):
        """obj[key], checked to be of `kind` (a type or tuple of types)."""
        if not isinstance(obj, dict):
            raise self.error(where, f"expected an object, got {_kind(obj)}")
        if key not in obj:
            raise self.error(where, f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.error(f"{where}.{key}", f"expected {_names(kind)}, got {_kind(value)}")
        return value

    def entries(self, obj, key: str, where: str = "top level") -> list:
        """obj[key] as a non-empty list."""
        value = self.field(obj, key, where, list)
        if not value:
            raise self.error(key, "expected a non-empty list, got []")
        return value


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {"str": "a string", "int": "an int", "list": "a list", "dict": "an object"}
    return " or ".join(words.get(k.__name__, k.__name__) for k in kinds)


def open_rgb(path: Path, source: str) -> Image.Image:
    """The image at `path` as RGB; a ValueError names `source` (the entry that pointed to it)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{source}: image file not found: {os.fspath(path)!r}") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{source}: cannot read image {os.fspath(path)!r} ({error})") from None
