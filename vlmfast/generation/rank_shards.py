"""`vlmfast generate --requests` split over torchrun ranks: each rank answers every world-th of the
requests still to do into its own file, OUT.rankR, and rank 0 merges those into OUT at the end.

    torchrun --nproc-per-node 2 -m vlmfast.cli generate --model DIR --requests IN.jsonl --out OUT.jsonl

Resumable after a crash of any rank: the next run first merges whatever rank files are left
(their complete lines; an id already in OUT is not written twice, so a merge cut short is merely
repeated), then reads OUT as a single process would and splits what is left again. Every rank
must see OUT's folder (one machine or a shared file system).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmfast import _atomic


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}")


def leftover_shards(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f"{out.name}.rank*") if p.name[len(out.name) + 5:].isdigit())


def _records(path: Path) -> list[tuple[object, str]]:
    """(id, line) of the complete result lines of a file (a line cut short is skipped)."""
    found = []
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            found.append((json.loads(line)["id"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return found


def merge(out: Path) -> int:
    """Appends the rank files' lines to OUT (ids answered there already skipped), then removes the
    rank files. Returns the number of lines moved."""
    shards = leftover_shards(out)
    if not shards:
        return 0
    answered = {rid for rid, line in _records(out) if "output" in json.loads(line)}
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a line cut short: dropped, as read_done drops it
    lines = []
    for shard in shards:
        for rid, line in _records(shard):
            if rid not in answered:
                lines.append(line + "\n")
                if "output" in json.loads(line):
                    answered.add(rid)
    _atomic.write_text(out, text + "".join(lines))  # OUT whole or as before, never cut
    for shard in shards:
        shard.unlink()
    return len(lines)


def totals(values: list[int], parallel) -> list[int]:
    """values summed over the ranks (every rank gets the sums)."""
    if not parallel.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, group=parallel.group)
    return [int(v) for v in t]
