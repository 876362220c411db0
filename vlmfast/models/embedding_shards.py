"""The on-disk layout of `vlmfast embed`'s output folder, and the checks that keep a rerun from
mixing results.

    out/shard-00000.npy          float32 (rows, P), L2-normalised (or .safetensors, key "embeddings")
    out/shard-00000.paths.txt    the rows' image paths, in row order
    out/shard-00000.json         the shard's record, written last: its presence means "complete".
                                 {"rows", "dim", "format", "fingerprint" (model: config and
                                 weights hashes, preprocessing, dtype), "inputs" (each row's
                                 {path, size, mtime_ns}), "failed" ({path, size, mtime_ns, reason})}
    out/shard-00001.partial/     the shard being filled: batch-00000.npy + batch-00000.json per
                                 batch, each written atomically (array first, record last)
    out/manifest.json            the summary, rewritten at the end of every run

An interruption loses at most the batch in flight. A rerun reads what is there (`scan`): records
made with another fingerprint or format, and rows whose image was changed or is no longer among
the inputs, are conflicts that the caller refuses (or clears with --overwrite); the inputs that
no record holds are the ones still to do, and go into the partial shard, then new shards.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmfast import _atomic

VERSION = 1
_SHARD = re.compile(r"shard-(\d{5})\.(json|npy|safetensors|paths\.txt|partial)")
_BATCH = re.compile(r"batch-(\d{5})\.(json|npy)")
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class Batch:
    """One committed batch of the partial shard."""

    index: int
    record: dict  # {"fingerprint", "inputs", "failed"}
    array_file: Path | None  # None: every image of the batch failed


@dataclass
class Scan:
    """What an output folder holds: complete shards' records by index, the partial shard's
    committed batches, and files an interrupted run left (removed by `tidy`)."""

    out: Path
    complete: dict[int, dict] = field(default_factory=dict)
    partial_index: int | None = None
    partial: list[Batch] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)  # shard files with neither a record nor batches

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, out: Path) -> Scan:
        scan = cls(Path(out))
        if not scan.out.is_dir():
            return scan
        files = {}
        for path in scan.out.iterdir():
            if _atomic.is_temporary(path):
                scan.leftovers.append(path)
                continue
            match = _SHARD.fullmatch(path.name)
            if match:
                files.setdefault(int(match.group(1)), {})[match.group(2)] = path
        for index, kinds in sorted(files.items()):
            if "json" in kinds:
                scan.complete[index] = _read_json(kinds["json"])
                if "partial" in kinds:  # completed, then interrupted before the batches were removed
                    scan.leftovers.append(kinds["partial"])
            elif "partial" in kinds:
                if scan.partial_index is not None:
                    raise ValueError(f"--out: {scan.out} holds two unfinished shards ({shard_name(scan.partial_index)}, "
                                     f"{shard_name(index)}); it was not written by one `vlmfast embed` at a time. "
                                     "Rerun with --overwrite to start again")
                scan.partial_index = index
                scan.partial = _read_batches(kinds["partial"], scan.leftovers)
                scan.leftovers += [p for kind, p in kinds.items() if kind != "partial"]  # an unfinished completion
            else:
                # shard files with no record and no batches: not written by this version's embed (an
                # older one, or another tool); never deleted without --overwrite
                scan.foreign += list(kinds.values())
        return scan

    @property
    def empty(self) -> bool:
        return not self.complete and not self.partial

    def records(self) -> list[tuple[str, dict]]:
        """(where, record) of every complete shard and committed batch, in row order."""
        found = [(f"{shard_name(i)}.json", r) for i, r in sorted(self.complete.items())]
        found += [(f"{shard_name(self.partial_index)}.partial/batch-{b.index:05d}.json", b.record)
                  for b in self.partial]
        return found

    def tidy(self) -> None:
        """Removes what an interrupted run left half-done (never a committed batch or shard)."""
        for path in self.leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.leftovers = []


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--out: cannot read {path} ({error}); rerun with --overwrite to start again") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise ValueError(f"--out: {path} is not a vlmfast embed record (version {VERSION}); "
                         "rerun with --overwrite to start again, or choose another --out")
    return record


def _read_batches(folder: Path, leftovers: list[Path]) -> list[Batch]:
    found: dict[int, dict] = {}
    for path in folder.iterdir():
        match = _BATCH.fullmatch(path.name)
        if match is None:
            leftovers.append(path)  # temporary files of a batch being written
        else:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = path
    batches = []
    for index, kinds in sorted(found.items()):
        if "json" not in kinds:
            leftovers += list(kinds.values())  # the array of a batch whose record was never written
            continue
        record = _read_json(kinds["json"])
        array = kinds.get("npy")
        if record["inputs"] and array is None:
            raise ValueError(f"--out: {kinds['json']} has no array file; rerun with --overwrite to start again")
        batches.append(Batch(index, record, array))
    expected = list(range(len(batches)))
    if [b.index for b in batches] != expected:
        # a gap: batches are committed in order, so a missing one means the folder was edited
        raise ValueError(f"--out: {folder} is missing committed batches; rerun with --overwrite to start again")
    return batches


# ---------------------------------------------------------------------------------- checks

@dataclass
class Plan:
    """What a rerun must do: `todo` inputs (in input order); `done` rows recorded; `failed`
    inputs recorded as unreadable and unchanged since (not retried); `conflicts` (messages)."""

    todo: list[str]
    done: int
    failed: list[dict]
    conflicts: list[str]


def plan(scan: Scan, inputs: list[dict], fingerprint: dict, fmt: str) -> Plan:
    """Compares what `scan` recorded with the current inputs ({path, size, mtime_ns}), model
    fingerprint and format."""
    from vlmfast.models.fingerprint import differences

    conflicts = []
    if scan.foreign:
        conflicts.append(f"{len(scan.foreign)} shard file(s) have no record of what they hold (an older vlmfast or "
                         f"another tool wrote them), e.g. {scan.foreign[0].name}")
    for where, record in scan.records():
        changed = differences(record.get("fingerprint", {}), fingerprint)
        if changed:
            conflicts.append(f"{where} was computed with another model or preprocessing ({'; '.join(changed)})")
            break
    for index, record in sorted(scan.complete.items()):
        if record.get("format") != fmt:
            conflicts.append(f"{shard_name(index)} is in the {record.get('format')} format, not --format {fmt}")
            break
    current = {item["path"]: item for item in inputs}
    embedded, removed, changed, failed_before = set(), [], [], {}
    for _, record in scan.records():
        for item in record["inputs"]:
            now = current.get(item["path"])
            if now is None:
                removed.append(item["path"])
            elif (now["size"], now["mtime_ns"]) != (item["size"], item["mtime_ns"]):
                changed.append(item["path"])
            embedded.add(item["path"])
        for item in record["failed"]:
            failed_before[item["path"]] = item
    if removed:
        conflicts.append(f"{len(removed)} embedded image(s) are no longer among --images, e.g. {removed[0]} "
                         "(paths are recorded as --images gives them: a rerun from another folder, or with the same "
                         "folder spelt differently, names other paths)")
    if changed:
        conflicts.append(f"{len(changed)} embedded image(s) changed on disk since, e.g. {changed[0]}")
    todo, failed = [], []
    for item in inputs:
        if item["path"] in embedded:
            continue
        before = failed_before.get(item["path"])
        if before is not None and (before["size"], before["mtime_ns"]) == (item["size"], item["mtime_ns"]):
            failed.append(before)  # still the same unreadable file: its failure stands
        else:
            todo.append(item["path"])  # new, or fixed since it failed
    return Plan(todo, len(embedded), failed, conflicts)


def clear(out: Path) -> int:
    """Removes every file of an embedding run from `out` (--overwrite); other files stay."""
    removed = 0
    if not out.is_dir():
        return removed
    for path in out.iterdir():
        if _SHARD.fullmatch(path.name) or path.name == MANIFEST or _atomic.is_temporary(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------------- writing

def write_batch(folder: Path, index: int, features: np.ndarray, record: dict) -> None:
    """One committed batch: the array, then the record that makes it count."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"batch-{index:05d}"
    if len(record["inputs"]):
        def save(tmp):
            with open(tmp, "wb") as handle:
                np.save(handle, features)
        _atomic.atomic_write(folder / f"{name}.npy", save)
    _atomic.write_text(folder / f"{name}.json", json.dumps({"version": VERSION, **record}))


def complete_shard(out: Path, index: int, batches: list[Batch], fmt: str, fingerprint: dict) -> dict:
    """Joins the partial shard's batches into shard-NNNNN.{fmt} + .paths.txt + .json (written in
    that order, the record last), then removes the batches. Returns the shard's record."""
    arrays = [np.load(b.array_file) for b in batches if b.array_file is not None]
    inputs = [item for b in batches for item in b.record["inputs"]]
    failed = [item for b in batches for item in b.record["failed"]]
    features = np.concatenate(arrays) if arrays else None
    name = shard_name(index)
    if not inputs:  # every image of the shard failed: its record alone keeps the failures
        record = {"version": VERSION, "rows": 0, "dim": 0, "format": fmt, "fingerprint": fingerprint,
                  "inputs": [], "failed": failed}
        _atomic.write_text(out / f"{name}.json", json.dumps(record))
        shutil.rmtree(out / f"{name}.partial", ignore_errors=True)
        return record
    if fmt == "npy":
        def save(tmp):
            with open(tmp, "wb") as handle:
                np.save(handle, features)
    else:
        from safetensors.numpy import save_file

        def save(tmp):
            save_file({"embeddings": np.ascontiguousarray(features)}, str(tmp))
    _atomic.atomic_write(out / f"{name}.{fmt}", save)
    _atomic.write_text(out / f"{name}.paths.txt", "".join(item["path"] + "\n" for item in inputs))
    record = {"version": VERSION, "rows": len(inputs), "dim": int(features.shape[1]),
              "format": fmt, "fingerprint": fingerprint, "inputs": inputs, "failed": failed}
    _atomic.write_text(out / f"{name}.json", json.dumps(record))
    shutil.rmtree(out / f"{name}.partial", ignore_errors=True)
    return record


def write_manifest(out: Path, scan: Scan, *, model: str, fingerprint: dict, fmt: str, inputs: int,
                   failed: list[dict]) -> dict:
    """manifest.json from the complete shards (called when no shard is partial)."""
    shards = [{"file": f"{shard_name(i)}.{r['format']}", "paths": f"{shard_name(i)}.paths.txt", "rows": r["rows"]}
              for i, r in sorted(scan.complete.items()) if r["rows"]]
    dims = {r["dim"] for r in scan.complete.values() if r["rows"]}
    manifest = {
        "model": model, "fingerprint": fingerprint, "format": fmt, "dim": dims.pop() if len(dims) == 1 else None,
        "inputs": inputs, "images": sum(s["rows"] for s in shards), "failed_count": len(failed),
        "shards": shards, "failed": [{"path": f["path"], "reason": f["reason"]} for f in failed],
    }
    _atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
