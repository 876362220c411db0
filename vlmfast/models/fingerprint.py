"""What a checkpoint folder holds, as hashes: the identity recorded with every output computed from
it (embedding shards, fine-tuning runs), so that a rerun with another model (or the same folder
with new weights) is refused rather than mixed with the old results.

    fingerprint("clip-dir")  # {"config_sha256", "weights_sha256", "preprocessor_sha256"}
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vlmfast.models import checkpoint

_CHUNK = 1 << 22


def file_sha256(path: str | Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over every weight file (model.safetensors, or the shards of an index, by name)."""
    digest = hashlib.sha256()
    for file in sorted(checkpoint.weight_files(model_dir), key=lambda p: p.name):
        digest.update(file.name.encode() + b"\0")
        file_sha256(file, digest)
    return digest.hexdigest()


def fingerprint(model_dir: str | Path, *, preprocessor: bool = True) -> dict:
    """{"config_sha256", "weights_sha256"} and, when asked and present, "preprocessor_sha256"
    (preprocessor_config.json: how images become pixels)."""
    model_dir = Path(model_dir)
    identity = {
        "config_sha256": file_sha256(model_dir / "config.json"),
        "weights_sha256": weights_sha256(model_dir),
    }
    if preprocessor and (model_dir / "preprocessor_config.json").is_file():
        identity["preprocessor_sha256"] = file_sha256(model_dir / "preprocessor_config.json")
    return identity


def differences(recorded: dict, current: dict) -> list[str]:
    """The keys whose values differ, worded for an error message ("weights_sha256 1a2b3c.. -> 4d5e6f..")."""
    changed = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old != new:
            show = lambda v: f"{v[:12]}.." if isinstance(v, str) and len(v) > 16 else repr(v)  # noqa: E731
            changed.append(f"{key} {show(old)} -> {show(new)}")
    return changed
