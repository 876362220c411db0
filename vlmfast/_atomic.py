"""Files written whole or not at all: write to a temporary file in the target's folder, then
rename it over the target (a reader, or a rerun after an interruption, never sees half a file).

The temporary file comes from mkstemp, which creates it 0600; before the rename it gets the mode
a plain open() would have given it (0666 minus the umask), so every file vlmfast writes has the
same permissions whether or not it was written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    # /proc gives it without changing it (os.umask() must set it to read it: a race with threads
    # that create files meanwhile)
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open(path, "w") gives a new file here: 0666 & ~umask."""
    return 0o666 & ~_umask()


def atomic_write(target: str | os.PathLike, write) -> None:
    """write(tmp_path) fills a temporary file next to `target`, which then replaces `target`.
    On any error (an interruption included) the temporary file is removed and `target` is left
    as it was."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def is_temporary(path: Path) -> bool:
    """A temporary file atomic_write leaves behind only when the process was killed outright."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)
