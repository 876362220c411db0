"""Reading JSON-lines request and data files, one shared rule for every reader."""

import json
import os
from collections.abc import Iterator


def records(path: str | os.PathLike, *, errors: list | None = None) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line of a JSONL file; where is "path:line" for the
    reader's own error messages. A line that is not JSON raises ValueError naming it, or, given an
    `errors` list, has that message appended to it and is skipped (to report every problem at once)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(_lines(handle, path), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if errors is None:
                    raise ValueError(f"{where}: not valid JSON ({err})") from None
                errors.append(f"{where}: not valid JSON ({err})")
                continue
            yield where, record


def _lines(handle, path):
    try:
        yield from handle
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file of JSON lines (an image or another binary file?)") from None
