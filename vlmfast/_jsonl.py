"""Reading JSON-lines request and data files, one shared rule for every reader."""

import json
import os
from collections.abc import Iterator


def records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line of a JSONL file; where is "path:line" for the
    reader's own error messages. A line that is not JSON raises ValueError naming it."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from None
