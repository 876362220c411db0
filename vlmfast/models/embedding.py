"""Batch inference over image files: embeddings written in resumable shards, zero-shot labels.

Images are decoded and resized/cropped by vlmfast.processing (the checkpoint's
preprocessor_config.json) into uint8 (B, H, W, C); normalisation happens inside the fused patch
embedding. Shard i covers images [i * shard_size, (i + 1) * shard_size) of the sorted list; its
paths file is written first, then its embeddings, each atomically, so a shard whose embeddings
file exists is complete and a rerun skips it.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from vlmfast.models import checkpoint
from vlmfast.models.clip import CLIP
from vlmfast.models.siglip import SigLIP
from vlmfast.models.tokenizer import load_tokenizer
from vlmfast.models.zeroshot import classify, zero_shot_classifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MODELS = {"clip": CLIP, "siglip": SigLIP}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path, *, device=None, dtype="float32"):
    """CLIP or SigLIP by config.json's model_type."""
    model_type = checkpoint.read_config(path).get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"--model: expected a CLIP or SigLIP checkpoint, config.json says model_type={model_type!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return MODELS[model_type].from_pretrained(path, device=device, dtype=DTYPES[dtype])


def list_images(images) -> list[str]:
    """A directory (searched recursively, sorted) or a text file with one path per line."""
    source = Path(images)
    if source.is_dir():
        found = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif source.is_file():
        found = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"--images: expected a directory or a list file, {images} does not exist")
    if not found:
        raise ValueError(f"--images: no images found in {images}")
    return found


def _batches(paths, processor, batch_size):
    """Yields (paths, uint8 (B, H, W, C)) for the images that decode; bad files are reported."""
    from vlmfast.processing import load_images

    for start in range(0, len(paths), batch_size):
        loaded = load_images(paths[start : start + batch_size], on_error="skip")
        for path, reason in loaded.failed:
            print(f"skipped {path}: {reason}", flush=True)
        if loaded.images:
            yield loaded.paths, processor(loaded.images, output="uint8").pixel_values


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


@torch.no_grad()
def _embed(model, processor, paths, batch_size):
    mean, std = (torch.tensor(v) for v in processor.patch_embed_normalization())
    device = next(model.parameters()).device
    done, feats = [], []
    for names, pixels in _batches(paths, processor, batch_size):
        out = model.encode_image(pixels.to(device), mean=mean.to(device), std=std.to(device))
        feats.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
        done += names
    return done, (torch.cat(feats) if feats else torch.empty(0, 0))


def embed_folder(model_dir, images, out, *, batch_size=64, shard_size=4096, fmt="npy", device=None, dtype="float32"):
    """Writes out/shard-NNNNN.{npy|safetensors} (float32 (n, P), L2-normalised) and
    out/shard-NNNNN.paths.txt (the n images, in row order), then out/manifest.json."""
    from vlmfast.processing import image_processor_from_pretrained

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard-size/--batch-size: expected positive sizes, got {shard_size}/{batch_size}")
    paths = list_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = None, None
    shards, skipped = [], 0
    for index, start in enumerate(range(0, len(paths), shard_size)):
        name = f"shard-{index:05d}"
        data_file = out / f"{name}.{fmt}"
        shards.append(data_file.name)
        if data_file.exists() and (out / f"{name}.paths.txt").exists():
            skipped += 1
            continue
        if model is None:
            model = load_model(model_dir, device=device, dtype=dtype)
            processor = image_processor_from_pretrained(model_dir)
        done, feats = _embed(model, processor, paths[start : start + shard_size], batch_size)
        _atomic(out / f"{name}.paths.txt", lambda tmp: Path(tmp).write_text("".join(p + "\n" for p in done)))
        if fmt == "npy":
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, feats.numpy())
        else:
            from safetensors.torch import save_file

            def write(tmp):
                save_file({"embeddings": feats.contiguous()}, str(tmp))
        _atomic(data_file, write)
    manifest = {"model": str(model_dir), "images": len(paths), "shards": shards, "format": fmt,
                "shard_size": shard_size, "skipped_shards": skipped}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _read_list(value, sep: str) -> list[str]:
    if value is None:
        return []
    if Path(value).is_file():
        return [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
    return [item.strip() for item in value.split(sep) if item.strip()]


def zeroshot_folder(model_dir, images, labels, *, templates=None, batch_size=64, top_k=1, device=None,
                    dtype="float32"):
    """Yields {"path", "labels": [top_k names], "scores": [cosine scores]} per image."""
    from vlmfast.processing import image_processor_from_pretrained

    classnames = _read_list(labels, ",")
    if not classnames:
        raise ValueError("--labels: expected at least one class name")
    prompts = _read_list(templates, "|") or ["a photo of a {}."]
    model = load_model(model_dir, device=device, dtype=dtype)
    classifier = zero_shot_classifier(model, load_tokenizer(model_dir), classnames, prompts)
    processor = image_processor_from_pretrained(model_dir)
    paths = list_images(images)
    k = min(top_k, len(classnames))
    for start in range(0, len(paths), batch_size):
        done, feats = _embed(model, processor, paths[start : start + batch_size], batch_size)
        if not done:
            continue
        scores, index = classify(feats.to(classifier.device), classifier).topk(k, dim=-1)
        for path, s, i in zip(done, scores.tolist(), index.tolist()):
            yield {"path": path, "labels": [classnames[j] for j in i], "scores": [round(v, 5) for v in s]}
