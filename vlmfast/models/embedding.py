"""Batch inference over image files: embeddings written in resumable shards, zero-shot labels.

Images are decoded and resized/cropped by vlmfast.processing (the checkpoint's
preprocessor_config.json) into uint8 (B, H, W, C); normalisation happens inside the fused patch
embedding.

`embed_folder` writes the layout of embedding_shards.py: every batch is committed as it is done
(an interruption loses at most one batch), every shard records the model it was computed with
(config and weights hashes, the preprocessing, the dtype) and the exact files of its rows (path,
size, modification time). A rerun embeds only the inputs no record holds (new images go into new
shards), and refuses, naming the problem, when the records were made with another model, format
or preprocessing, or when an embedded image changed or left the inputs (--overwrite starts over).

An image that cannot be read is left out, named on stderr with its reason and listed in the
manifest's "failed" (skip_bad_inputs=True, the default); with skip_bad_inputs=False every input
is decoded once before the model is loaded and all the problems are reported together.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import torch

from vlmfast.eval._progress import Progress
from vlmfast.models import checkpoint
from vlmfast.models import embedding_shards as shards
from vlmfast.models.clip import CLIP
from vlmfast.models.image_inputs import IMAGE_SUFFIXES, identity, read_images, resolve_images  # noqa: F401
from vlmfast.models.siglip import SigLIP
from vlmfast.models.tokenizer import load_tokenizer
from vlmfast.models.zeroshot import class_probabilities, classify, zero_shot_classifier

MODELS = {"clip": CLIP, "siglip": SigLIP}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORES = ("probability", "cosine")
MAX_LISTED_PROBLEMS = 20


def load_model(path, *, device=None, dtype="float32"):
    """CLIP or SigLIP by config.json's model_type."""
    model_type = checkpoint.read_config(path).get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"--model: expected a CLIP or SigLIP checkpoint, config.json says model_type={model_type!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return MODELS[model_type].from_pretrained(path, device=device, dtype=DTYPES[dtype])


def list_images(images) -> list[str]:
    """The image paths `--images` names (see image_inputs.resolve_images)."""
    return resolve_images(images)


def _decode(paths: list[str]):
    """(loaded paths, PIL images, [(path, reason)] of the files that failed)."""
    return read_images(paths)


def check_images(paths: list[str], *, show_progress: bool = True, flag: str = "--images") -> None:
    """Decodes every file once; one ValueError listing every file that cannot be read."""
    problems = []
    with Progress(len(paths), "checking images", unit="images", enabled=show_progress) as bar:
        for start in range(0, len(paths), 64):
            problems += _decode(paths[start:start + 64])[2]
            bar.update(len(paths[start:start + 64]))
    if problems:
        raise ValueError(problem_list(f"{flag}: {len(problems)} of {len(paths)} image(s) cannot be read "
                                      "(--skip-bad-inputs leaves them out and carries on)", problems))


def problem_list(headline: str, problems: list[tuple[str, str]]) -> str:
    lines = [f"  {path}: {reason}" for path, reason in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join([headline + ":", *lines])


class ImageEncoder:
    """Decoded images -> float32 (B, P) L2-normalised features, on the model's device."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        mean, std = (torch.tensor(v) for v in processor.patch_embed_normalization())
        self.mean, self.std = mean.to(self.device), std.to(self.device)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        pixels = self.processor(images, output="uint8").pixel_values.to(self.device)
        out = self.model.encode_image(pixels, mean=self.mean, std=self.std)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


def _encoder(model_dir, device, dtype) -> ImageEncoder:
    from vlmfast.processing import image_processor_from_pretrained

    processor = image_processor_from_pretrained(model_dir)  # a bad preprocessor config fails before the weights load
    return ImageEncoder(load_model(model_dir, device=device, dtype=dtype), processor)


def _check_sizes(batch_size: int, shard_size: int | None = None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"--shard-size: expected a positive integer, got {shard_size!r}")


# ---------------------------------------------------------------------------------- embed

def embed_folder(model_dir, images, out, *, batch_size=64, shard_size=4096, fmt="npy", device=None,
                 dtype="float32", overwrite=False, skip_bad_inputs=True, show_progress=True, log=None) -> dict:
    """Embeds the images `images` names (a folder, a list file or one image) into `out` (see the
    module docstring and embedding_shards.py); returns the manifest (also out/manifest.json).
    log(message): diagnostics (default: stderr, through the progress bar)."""
    from vlmfast.models.fingerprint import fingerprint

    _check_sizes(batch_size, shard_size)
    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"--format: expected npy or safetensors, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; expected a folder")
    paths = resolve_images(images)
    inputs = [identity(p) for p in paths]
    checkpoint.read_config(model_dir)  # a folder without config.json: a clear error before hashing
    current = {**fingerprint(model_dir), "dtype": dtype}
    if overwrite:
        shards.clear(out)
    scan = shards.Scan.read(out)
    plan = shards.plan(scan, inputs, current, fmt)
    if plan.conflicts:
        raise ValueError(
            f"--out: {out} holds embeddings that do not match this run:\n  " + "\n  ".join(plan.conflicts)
            + "\nrerun with --overwrite to replace them, or choose another --out")
    if plan.todo and not skip_bad_inputs:
        check_images(plan.todo, show_progress=show_progress)
    scan.tidy()

    failed = list(plan.failed)
    if plan.todo or scan.partial:
        encoder = _encoder(model_dir, device, dtype) if plan.todo else None  # outputs only once the model loaded
        out.mkdir(parents=True, exist_ok=True)
        (out / shards.MANIFEST).unlink(missing_ok=True)  # it describes the old state until rewritten below
        with Progress(len(plan.todo), "embed", unit="images", enabled=show_progress) as bar:
            say = log or bar.write
            failed += _fill_shards(out, scan, plan.todo, {i["path"]: i for i in inputs}, encoder, current,
                                   fmt=fmt, batch_size=batch_size, shard_size=shard_size, bar=bar, log=say)
        scan = shards.Scan.read(out)
    if not out.is_dir():  # nothing to embed and nothing there (every input failed before)
        out.mkdir(parents=True)
    return shards.write_manifest(out, scan, model=os.fspath(model_dir), fingerprint=current, fmt=fmt,
                                 inputs=len(inputs), failed=failed)


def _fill_shards(out: Path, scan: shards.Scan, todo: list[str], identities: dict, encoder, current: dict, *,
                 fmt: str, batch_size: int, shard_size: int, bar: Progress, log) -> list[dict]:
    """Embeds `todo` into the partial shard, then new shards, committing every batch. Returns the
    inputs that failed, with their reasons."""
    index = scan.partial_index if scan.partial_index is not None else max(scan.complete, default=-1) + 1
    batches = list(scan.partial)
    rows = sum(len(b.record["inputs"]) for b in batches)
    queue, failed = deque(todo), []
    while queue:
        if rows >= shard_size:
            shards.complete_shard(out, index, batches, fmt, current)
            index, batches, rows = index + 1, [], 0
            continue
        chunk = [queue.popleft() for _ in range(min(batch_size, shard_size - rows, len(queue)))]
        done, images, problems = _decode(chunk)
        for path, reason in problems:
            log(f"skipped {path}: {reason}")
        record = {"fingerprint": current, "inputs": [identities[p] for p in done],
                  "failed": [{**identities[p], "reason": reason} for p, reason in problems]}
        features = encoder(images).numpy() if images else None
        folder = out / f"{shards.shard_name(index)}.partial"
        shards.write_batch(folder, len(batches), features, record)
        batches.append(shards.Batch(len(batches), record, folder / f"batch-{len(batches):05d}.npy" if done else None))
        rows += len(done)
        failed += record["failed"]
        bar.update(len(chunk))
    if batches:
        shards.complete_shard(out, index, batches, fmt, current)
    return failed


# ---------------------------------------------------------------------------------- zero-shot

def _names(value, parse):
    return parse(value) if isinstance(value, str) else list(value)


def zeroshot_folder(model_dir, images, labels, *, templates=None, batch_size=64, top_k=1, device=None,
                    dtype="float32", scores="probability", skip_bad_inputs=True, show_progress=True, log=None):
    """Yields one row per input image, in input order:
    {"path", "labels": [top_k class names], "scores": [their scores]} or, for an image that cannot
    be read, {"path", "error": reason}.

    labels / templates: lists, or the CLI's strings (cli_args.labels / templates). scores:
    "probability" (default): CLIP's softmax over the labels of exp(logit_scale) * cosine, as
    open_clip's zero-shot classification; SigLIP's sigmoid(exp(logit_scale) * cosine + logit_bias),
    its own per-label probability. "cosine": the raw cosine similarities."""
    import argparse

    from vlmfast import cli_args

    try:
        classnames = _names(labels, cli_args.labels)
        prompts = _names(templates, cli_args.templates) if templates is not None else ["a photo of a {}."]
        prompts = [cli_args.template(t) for t in prompts]
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--labels/--templates: {error}") from None
    if len(classnames) < 2:
        raise ValueError(f"--labels: expected at least two class names, got {classnames!r}")
    _check_sizes(batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(classnames):
        raise ValueError(f"--top-k: expected 1 to {len(classnames)} (the number of labels), got {top_k!r}")
    if scores not in SCORES:
        raise ValueError(f"--scores: expected one of {', '.join(SCORES)}, got {scores!r}")
    paths = resolve_images(images)
    if not skip_bad_inputs:
        check_images(paths, show_progress=show_progress)
    encoder = _encoder(model_dir, device, dtype)
    classifier = zero_shot_classifier(encoder.model, load_tokenizer(model_dir), classnames, prompts)
    with Progress(len(paths), "zeroshot", unit="images", enabled=show_progress) as bar:
        say = log or bar.write
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            done, images, problems = _decode(chunk)
            errors = dict(problems)
            for path, reason in problems:
                say(f"skipped {path}: {reason}")
            rows = {}
            if images:
                features = encoder(images).to(classifier.device)
                values = classify(features, classifier) if scores == "cosine" else \
                    class_probabilities(encoder.model, features, classifier)
                top, index = values.topk(top_k, dim=-1)
                for path, s, i in zip(done, top.tolist(), index.tolist()):
                    rows[path] = {"path": path, "labels": [classnames[j] for j in i], "scores": [round(v, 5) for v in s]}
            for path in chunk:
                yield rows[path] if path in rows else {"path": path, "error": errors[path]}
            bar.update(len(chunk))


__all__ = ["embed_folder", "list_images", "load_model", "zeroshot_folder", "check_images", "ImageEncoder"]
