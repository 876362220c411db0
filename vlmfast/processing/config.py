"""Reading a checkpoint's preprocessor_config.json into plain, validated values.

The keys and their defaults follow transformers' image processors, so that a checkpoint's file
means the same thing here as there. Keys this package has no use for (processor_class,
image_processor_type, video_sampling, ...) are ignored; values it cannot honour raise ValueError
naming the key, never a silent different result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

CONFIG_NAME = "preprocessor_config.json"

# PIL.Image.Resampling values, the integers transformers writes into "resample".
RESAMPLE_NAMES = {int(member): member.name.lower() for member in Image.Resampling}

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of `path`: a preprocessor_config.json file or the checkpoint directory holding it."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"path: expected a checkpoint directory with {CONFIG_NAME} or the file itself, got {path!r}")
    with open(file, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def size_dict(name: str, value, *, default_to_square: bool, allowed: Sequence[frozenset]) -> dict[str, int]:
    """A size given as int, (height, width) or dict, as transformers' get_size_dict reads it."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {value!r}")
    if isinstance(value, int):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {value!r}")
    keys = frozenset(value)
    if keys not in allowed:
        wanted = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in allowed)
        raise ValueError(f"{name}: unsupported keys {sorted(keys)}; expected {wanted}")
    for key, edge in value.items():
        if isinstance(edge, bool) or not isinstance(edge, int) or edge < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {edge!r}")
    return dict(value)


def resample_filter(value) -> int:
    """A PIL.Image.Resampling value (int or enum) checked against the filters Pillow has."""
    if isinstance(value, bool) or not isinstance(value, int) or int(value) not in RESAMPLE_NAMES:
        choices = ", ".join(f"{k} ({v})" for k, v in sorted(RESAMPLE_NAMES.items()))
        raise ValueError(f"resample: expected a PIL.Image.Resampling value, one of {choices}; got {value!r}")
    return int(value)


def channel_values(name: str, value, channels: int = 3) -> tuple[float, ...]:
    """image_mean / image_std: one float for every channel (a single float is repeated)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * channels
    if isinstance(value, Sequence) and len(value) == channels and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return tuple(float(v) for v in value)
    raise ValueError(f"{name}: expected {channels} floats (one per RGB channel), got {value!r}")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def merged(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict:
    """defaults <- config file <- keyword overrides; a None in the file means 'use the default' as in transformers."""
    values = dict(defaults)
    for source in (config or {}, overrides):
        for key, value in source.items():
            if key in defaults and value is not None:
                values[key] = value
    return values
