"""ops.linear's GEMM choices kept on disk, so that only the first process on a machine pays for
the timing (ops/_linear_choice.py).

One JSON file per machine setting: the CPU (model, family, the GEMM instruction sets), the thread
count, the torch and vlmfast versions and the native GEMM's configuration (the level in use and
its blocking) are hashed into its name, since a choice made under any other of them says nothing
(the float32 KC going from 128 to 256 moved large classes by 5-14 %, while the version stayed).
Where: $VLMFAST_CACHE_DIR, else $XDG_CACHE_HOME/vlmfast, else ~/.cache/vlmfast;
VLMFAST_CACHE_DIR=off keeps choices in memory only. A file that cannot be read or parsed is
ignored (the classes are timed again), one that cannot be written is skipped: the cache never
makes a call fail. Writes go to a temporary file renamed over the old one, so two
processes deciding at once leave one complete file, not a torn one.
"""

import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from vlmfast.runtime import cpuinfo

# a class's key (ops/_linear_choice.shape_class); a file of another layout (the older "cached"
# flag instead of "work") does not load, and its classes are timed again
FIELDS = ("x_dtype", "w_dtype", "compute", "n", "k", "m_bucket", "work")
_loaded_for: str | None = None  # the file last merged into the decisions (once per setting)


@functools.cache
def _cpu_identity() -> str:
    """The CPU part of the setting (read once: the CPU does not change under a process)."""
    fields = cpuinfo.first_cpu()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    fields["flags"] = " ".join(flag for flag in fields.get("flags", "").split() if flag in wanted)
    return "|".join(fields.get(k, "") for k in cpuinfo.KEYS) or platform.processor()


def _gemm_identity() -> str:
    """The native GEMM's level and blocking as vlmfast.native.linear.describe() gives them, or ''
    without the extension. Read per call: tests force other levels within a process."""
    try:
        from vlmfast.native import linear as native_linear

        return ",".join(f"{key}={value}" for key, value in sorted(native_linear.describe().items()))
    except (ImportError, AttributeError, RuntimeError):
        return ""


def path() -> Path | None:
    """The file for this machine setting, or None when the cache is off."""
    where = os.environ.get("VLMFAST_CACHE_DIR", "").strip()
    if where.lower() == "off":
        return None
    if not where:
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "vlmfast")
    from vlmfast import __version__

    setting = (f"{_cpu_identity()}|threads={torch.get_num_threads()}|torch={torch.__version__}|vlmfast={__version__}"
               f"|gemm={_gemm_identity()}")
    digest = hashlib.sha256(setting.encode()).hexdigest()[:16]
    return Path(where) / f"linear_choice-{digest}.json"


def load_into(decisions: dict) -> bool:
    """Merges the file's decisions into `decisions` (those already there win) the first time it is
    asked for this setting; True when anything was added."""
    global _loaded_for
    file = path()
    if file is None or str(file) == _loaded_for:
        return False
    _loaded_for = str(file)
    try:
        entries = json.loads(file.read_text())
        added = False
        for entry in entries:
            key = tuple(entry[name] for name in FIELDS)
            if key not in decisions and entry["backend"] in ("vlmfast", "torch"):
                decisions[key] = {k: v for k, v in entry.items() if k not in FIELDS}
                added = True
        return added
    except (OSError, ValueError, TypeError, KeyError):
        return False  # missing, unreadable or not ours: time the classes again


def save(decisions: dict) -> None:
    file = path()
    if file is None:
        return
    entries = [{**dict(zip(FIELDS, key)), **value} for key, value in decisions.items()]
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=0)
        os.replace(tmp, file)
        tmp = None
    except OSError:
        pass  # a read-only home: decide again next process
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def forget_loaded() -> None:
    """Lets the next lookup read the file again (after the in-memory decisions were cleared)."""
    global _loaded_for
    _loaded_for = None
