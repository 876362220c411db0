"""Evaluate a model on the standard file formats and write a JSON report.

Contrastive models (CLIP, SigLIP or anything with the same two methods):
    model.encode_image(pixel_values (B, 3, H, W)) -> (B, P)
    model.encode_text(input_ids (B, L), attention_mask (B, L) or None) -> (B, P)
    preprocess(PIL.Image) -> (3, H, W) tensor
    tokenize(list[str]) -> (input_ids, attention_mask), a dict with those keys, or input_ids
Generative models: generate(list[PIL.Image], list[str]) -> list[str], one answer per prompt.

- run_zeroshot: a folder per class (root/<class>/*.jpg) -> top-1 / top-5 accuracy.
- run_retrieval: COCO or Flickr30k captions (Karpathy split JSON or COCO captions JSON) ->
  Recall@K in both directions.
- run_vqa: VQA questions + annotations JSON -> VQA accuracy (overall, per answer / question type).
- run_caption: COCO captions JSON -> BLEU-1..4, CIDEr-D, ROUGE-L.
Every runner returns the report as a dict and, given `report=`, writes it as JSON.

Before the first batch every image is decoded once: files that cannot be read are reported
together, in one ValueError naming each entry and file (skip_bad_inputs=False, the default: a
metric over part of a benchmark is not its number), or left out of the evaluation and listed in
the report's "failed" with the entry, the file and the reason (skip_bad_inputs=True).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmfast import _atomic
from vlmfast.eval._io import JsonFile, open_rgb
from vlmfast.eval._progress import progress
from vlmfast.eval.caption import bleu, cider_d, rouge_l, tokenize_caption
from vlmfast.eval.retrieval import recall_at_k, zero_shot_accuracy
from vlmfast.eval.vqa import question_accuracy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


# ------------------------------------------------------------------------------------ helpers


def _batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return batch_size


def _batches(items: list, batch_size: int, desc: str, show_progress: bool):
    starts = range(0, len(items), batch_size)
    for start in progress(starts, len(starts), desc, enabled=show_progress):
        yield items[start : start + batch_size]


def _placement(model, device) -> tuple[torch.device, torch.dtype | None]:
    """Where inputs go: `device` or the model's first parameter's device (CPU for a model without
    parameters), and the dtype float pixels are cast to (the model's, when it has parameters)."""
    dtype = None
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            device = parameter.device if device is None else device
            dtype = parameter.dtype if parameter.is_floating_point() else None
            break
    return torch.device(device if device is not None else "cpu"), dtype


def _check_model(model) -> None:
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise TypeError(
                "model: expected an object with encode_image and encode_text methods, "
                f"{type(model).__name__} has no {method}"
            )


def _features(output, name: str, rows: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != rows:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model.{name}: expected a ({rows}, P) tensor, got {shape}")
    # L2-normalised in float32: similarities are cosines, as CLIP-style evaluation uses.
    return torch.nn.functional.normalize(output.float(), dim=-1).cpu()


def _pixels(preprocess, images, placement) -> torch.Tensor:
    tensors = []
    for image in images:
        pixels = preprocess(image)
        single = isinstance(pixels, torch.Tensor) and (
            pixels.dim() == 3 or (pixels.dim() == 4 and pixels.shape[0] == 1)
        )
        if not single:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"preprocess: expected a (3, H, W) tensor per image, got {shape}")
        tensors.append(pixels.reshape(pixels.shape[-3:]))
    device, dtype = placement
    pixels = torch.stack(tensors).to(device)
    return pixels.to(dtype) if dtype is not None and pixels.is_floating_point() else pixels


def _tokens(tokenize, texts: list[str], device):
    out = tokenize(texts)
    if isinstance(out, dict):
        input_ids, attention_mask = out.get("input_ids"), out.get("attention_mask")
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        input_ids, attention_mask = out
    else:
        input_ids, attention_mask = out, None
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != len(texts):
        raise ValueError(f"tokenize: expected input_ids of shape ({len(texts)}, L) for {len(texts)} texts")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    return input_ids.to(device), attention_mask


def _encode_images(model, preprocess, paths, sources, batch_size, placement, desc, show_progress):
    items = list(zip(paths, sources))
    features = []
    with torch.inference_mode():
        for batch in _batches(items, batch_size, desc, show_progress):
            images = [open_rgb(path, source) for path, source in batch]
            output = model.encode_image(_pixels(preprocess, images, placement))
            features.append(_features(output, "encode_image", len(batch)))
    return torch.cat(features)


def _encode_texts(model, tokenize, texts, batch_size, device, desc, show_progress):
    features = []
    with torch.inference_mode():
        for batch in _batches(texts, batch_size, desc, show_progress):
            input_ids, attention_mask = _tokens(tokenize, batch, device)
            output = model.encode_text(input_ids, attention_mask)
            features.append(_features(output, "encode_text", len(batch)))
    return torch.cat(features)


def _readable(items: list, path_of, source_of, skip_bad_inputs: bool, show_progress: bool) -> tuple[list, list]:
    """(items whose image decodes, [{"source", "image", "reason"}] of the others); every image is
    decoded once, on threads. Unless skip_bad_inputs, any failure raises one ValueError listing all."""
    from vlmfast.models.image_inputs import read_images

    paths = list(dict.fromkeys(os.fspath(path_of(item)) for item in items))
    bad = {}
    chunks = range(0, len(paths), 64)
    for start in progress(chunks, len(chunks), "checking images", enabled=show_progress):
        bad.update(read_images(paths[start:start + 64])[2])
    kept, failed = [], []
    for item in items:
        path = os.fspath(path_of(item))
        if path in bad:
            failed.append({"source": source_of(item), "image": path, "reason": bad[path]})
        else:
            kept.append(item)
    if failed and not skip_bad_inputs:
        lines = [f"  {f['source']}: " + (f"image file not found: {f['image']!r}" if f["reason"] == "no such file"
                                         else f"cannot read image {f['image']!r} ({f['reason']})") for f in failed[:20]]
        if len(failed) > 20:
            lines.append(f"  ... and {len(failed) - 20} more")
        raise ValueError(f"{len(failed)} of {len(items)} entries have an image that cannot be read "
                         "(skip_bad_inputs / --skip-bad-inputs evaluates the others):\n" + "\n".join(lines))
    if not kept:
        raise ValueError(f"no entry has a readable image ({len(failed)} failed, e.g. {failed[0]['image']}: "
                         f"{failed[0]['reason']})")
    return kept, failed


def _write(report: dict, path) -> dict:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic.write_text(path, json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------------------------- zero-shot


def class_folders(root) -> tuple[list[str], list[Path], list[int]]:
    """(class folder names sorted, image paths, label per image) of a folder-per-class tree."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root: expected a directory with one sub-folder per class, got {os.fspath(root)!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"root: no class sub-folders in {os.fspath(root)!r}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"root: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {os.fspath(root)!r}")
    return classes, paths, labels


def run_zeroshot(model, root, preprocess, tokenize, *, templates=DEFAULT_TEMPLATES, class_names=None,
                 batch_size: int = 64, device=None, report=None, show_progress: bool = True,
                 skip_bad_inputs: bool = False) -> dict:
    """Zero-shot classification of the images under root/<class>/ (classes = sorted folder names).

    Each class is described by `templates` (str.format with the class name; default
    "a photo of a {}."); its text embedding is the mean of the L2-normalised template embeddings,
    normalised again. Logits are cosines of normalised image and class embeddings.
    class_names: a dict folder -> name or a list in sorted-folder order; default: the folder
    name with "_" read as a space. Returns {"top1", "top5", "per_class_top1", ...}.
    """
    _check_model(model)
    batch_size = _batch_size(batch_size)
    folders, paths, labels = class_folders(root)
    if class_names is None:
        names = [folder.replace("_", " ") for folder in folders]
    elif isinstance(class_names, dict):
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise ValueError(f"class_names: no name for the class folders {missing}")
        names = [class_names[f] for f in folders]
    else:
        names = list(class_names)
        if len(names) != len(folders):
            raise ValueError(f"class_names: expected {len(folders)} names (one per class folder), got {len(names)}")
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"templates: expected strings with a '{{}}' for the class name, got {templates!r}")
    source = f"root {os.fspath(root)!r}"
    kept, failed = _readable(list(zip(paths, labels)), lambda item: item[0], lambda item: source,
                             skip_bad_inputs, show_progress)
    paths, labels = [path for path, _ in kept], [label for _, label in kept]
    placement = _placement(model, device)

    prompts = [template.format(name) for name in names for template in templates]
    text = _encode_texts(model, tokenize, prompts, batch_size, placement[0], "zero-shot: classes", show_progress)
    classes = torch.nn.functional.normalize(text.reshape(len(names), len(templates), -1).mean(1), dim=-1)
    sources = [source] * len(paths)
    images = _encode_images(model, preprocess, paths, sources, batch_size, placement,
                            "zero-shot: images", show_progress)
    logits = images @ classes.T
    accuracy = zero_shot_accuracy(logits, labels, ks=(1, 5))
    predicted = logits.argmax(dim=1).tolist()
    per_class = {}
    for label, name in enumerate(names):
        rows = [i for i, l in enumerate(labels) if l == label]
        per_class[name] = sum(predicted[i] == label for i in rows) / len(rows) if rows else None
    return _write(
        {
            "task": "zeroshot",
            "root": os.fspath(root),
            "num_images": len(paths),
            "num_classes": len(names),
            "classes": names,
            "templates": templates,
            "top1": accuracy[1],
            "top5": accuracy[5],
            "per_class_top1": per_class,
            "failed": failed,
        },
        report,
    )


# ---------------------------------------------------------------------------------- retrieval


@dataclass
class CaptionSet:
    """Images and their reference captions, from either caption JSON layout."""

    image_ids: list            # one id per image (COCO id, or the Karpathy file name)
    paths: list[Path]
    captions: list[list[str]]  # per image, its captions


def load_captions(annotations, image_root, *, split: str | None = "test") -> CaptionSet:
    """Reads COCO captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}) or a Karpathy split JSON ({"images": [{"filename", "filepath"?, "split",
    "sentences": [{"raw"}]}]}; only images of `split` are kept, None keeps all)."""
    file = JsonFile(annotations, "annotations")
    root = Path(image_root)
    images = file.entries(file.data, "images")
    if "annotations" in file.data:
        return _coco_captions(file, images, root)
    ids, paths, captions = [], [], []
    for k, entry in enumerate(images):
        where = f"images[{k}]"
        name = file.field(entry, "filename", where, str)
        if split is not None and file.field(entry, "split", where, str) != split:
            continue
        folder = entry.get("filepath", "")
        sentences = file.field(entry, "sentences", where, list)
        texts = [file.field(s, "raw", f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
        if not texts:
            raise file.error(f"{where}.sentences", "expected at least one caption, got []")
        ids.append(name)
        paths.append(root / folder / name)
        captions.append(texts)
    if not ids:
        raise file.error("images", f"no image has split {split!r}")
    return CaptionSet(ids, paths, captions)


def _coco_captions(file: JsonFile, images: list, root: Path) -> CaptionSet:
    position, ids, paths = {}, [], []
    for k, entry in enumerate(images):
        image_id = file.field(entry, "id", f"images[{k}]", (int, str))
        if image_id in position:
            raise file.error(f"images[{k}].id", f"duplicate image id {image_id!r}")
        position[image_id] = k
        ids.append(image_id)
        paths.append(root / file.field(entry, "file_name", f"images[{k}]", str))
    captions = [[] for _ in ids]
    for k, entry in enumerate(file.entries(file.data, "annotations")):
        image_id = file.field(entry, "image_id", f"annotations[{k}]", (int, str))
        if image_id not in position:
            raise file.error(f"annotations[{k}].image_id", f"{image_id!r} is not the id of any entry of images")
        captions[position[image_id]].append(file.field(entry, "caption", f"annotations[{k}]", str))
    for k, texts in enumerate(captions):
        if not texts:
            raise file.error(f"images[{k}]", f"image id {ids[k]!r} has no caption in annotations")
    return CaptionSet(ids, paths, captions)


def run_retrieval(model, annotations, image_root, preprocess, tokenize, *, split: str | None = "test",
                  ks=(1, 5, 10), batch_size: int = 64, device=None, report=None,
                  show_progress: bool = True, skip_bad_inputs: bool = False) -> dict:
    """Image-text retrieval (COCO / Flickr30k style): Recall@K for image->text and text->image.

    An image query is correct at K when any of its captions is among the K most similar
    captions; a caption query when its image is among the K most similar images.
    Returns {"image_to_text": {"R@1": ...}, "text_to_image": {...}, "mean_recall", ...}.
    """
    _check_model(model)
    batch_size = _batch_size(batch_size)
    data = load_captions(annotations, image_root, split=split)
    kept, failed = _readable(list(zip(data.image_ids, data.paths, data.captions)), lambda item: item[1],
                             lambda item: f"annotations image {item[0]!r}", skip_bad_inputs, show_progress)
    data = CaptionSet(*(list(column) for column in zip(*kept)))
    placement = _placement(model, device)
    texts = [caption for captions in data.captions for caption in captions]
    text_owner = [i for i, captions in enumerate(data.captions) for _ in captions]
    sources = [f"annotations image {image_id!r}" for image_id in data.image_ids]
    image_features = _encode_images(model, preprocess, data.paths, sources, batch_size, placement,
                                    "retrieval: images", show_progress)
    text_features = _encode_texts(model, tokenize, texts, batch_size, placement[0], "retrieval: texts", show_progress)
    similarity = image_features @ text_features.T
    captions_of = [[] for _ in data.paths]
    for t, owner in enumerate(text_owner):
        captions_of[owner].append(t)
    i2t = recall_at_k(similarity, captions_of, ks=ks)
    t2i = recall_at_k(similarity.T, [[owner] for owner in text_owner], ks=ks)
    values = list(i2t.values()) + list(t2i.values())
    return _write(
        {
            "task": "retrieval",
            "annotations": os.fspath(annotations),
            "num_images": len(data.paths),
            "num_texts": len(texts),
            "image_to_text": {f"R@{k}": v for k, v in i2t.items()},
            "text_to_image": {f"R@{k}": v for k, v in t2i.items()},
            "mean_recall": sum(values) / len(values),
            "failed": failed,
        },
        report,
    )


# ---------------------------------------------------------------------------------- generation


def _generate(generate, images, prompts, what: str) -> list[str]:
    answers = generate(images, prompts)
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or len(answers) != len(prompts):
        got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
        raise ValueError(f"generate: expected a list of {len(prompts)} strings ({what}), got {got}")
    for k, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"generate: answer {k} is {type(answer).__name__}, expected a string")
    return list(answers)


def run_vqa(generate, questions, annotations, image_root, *,
            image_file: str = "COCO_val2014_{image_id:012d}.jpg", prompt: str = "{question}",
            batch_size: int = 16, normalize_references: str = "official", report=None,
            show_progress: bool = True, skip_bad_inputs: bool = False) -> dict:
    """VQA accuracy of `generate` on a VQA questions file and its annotations file.

    questions: JSON {"questions": [{"question_id", "image_id", "question"}]};
    annotations: JSON {"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"?,
    "question_type"?}]}. The image of a question is image_root / image_file.format(image_id=...)
    (VQA v2 val names by default), or image_root / its "image" field when it has one.
    Each prompt is prompt.format(question=...).
    Returns accuracy in [0, 1] overall and per answer / question type, and the predictions in
    the official results format ([{"question_id", "answer"}]).
    """
    if not callable(generate):
        raise TypeError(f"generate: expected a callable (images, prompts) -> answers, got {type(generate).__name__}")
    batch_size = _batch_size(batch_size)
    qfile = JsonFile(questions, "questions")
    afile = JsonFile(annotations, "annotations")
    truth = {}
    for k, entry in enumerate(afile.entries(afile.data, "annotations")):
        where = f"annotations[{k}]"
        qid = afile.field(entry, "question_id", where, (int, str))
        answers = afile.field(entry, "answers", where, list)
        texts = [afile.field(a, "answer", f"{where}.answers[{j}]", str) for j, a in enumerate(answers)]
        if not texts:
            raise afile.error(f"{where}.answers", "expected at least one answer, got []")
        truth[qid] = (texts, entry.get("answer_type"), entry.get("question_type"))
    items = []
    for k, entry in enumerate(qfile.entries(qfile.data, "questions")):
        where = f"questions[{k}]"
        qid = qfile.field(entry, "question_id", where, (int, str))
        if qid not in truth:
            raise afile.error("annotations", f"no annotation for question_id {qid!r} ({where} of the questions file)")
        if isinstance(entry.get("image"), str):  # sets that name the file (TextVQA, VizWiz style)
            path = Path(image_root) / entry["image"]
        else:
            path = image_root_path(image_root, image_file, qfile.field(entry, "image_id", where, (int, str)))
        question = qfile.field(entry, "question", where, str)
        items.append((qid, path, question, f"questions file {where}"))
    items, failed = _readable(items, lambda item: item[1], lambda item: item[3], skip_bad_inputs, show_progress)

    predictions, scores = [], []
    by_answer_type, by_question_type = {}, {}
    for batch in _batches(items, batch_size, "vqa", show_progress):
        images = [open_rgb(path, source) for _, path, _, source in batch]
        answers = _generate(generate, images, [prompt.format(question=q) for _, _, q, _ in batch], "answers")
        for (qid, _, _, _), answer in zip(batch, answers):
            references, answer_type, question_type = truth[qid]
            score = question_accuracy(answer, references, normalize_references=normalize_references)
            predictions.append({"question_id": qid, "answer": answer})
            scores.append(score)
            if answer_type is not None:
                by_answer_type.setdefault(str(answer_type), []).append(score)
            if question_type is not None:
                by_question_type.setdefault(str(question_type), []).append(score)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return _write(
        {
            "task": "vqa",
            "questions": os.fspath(questions),
            "num_questions": len(scores),
            "accuracy": mean(scores),
            "per_answer_type": {k: mean(v) for k, v in sorted(by_answer_type.items())},
            "per_question_type": {k: mean(v) for k, v in sorted(by_question_type.items())},
            "predictions": predictions,
            "failed": failed,
        },
        report,
    )


def image_root_path(image_root, image_file: str, image_id) -> Path:
    try:
        name = image_file.format(image_id=image_id)
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"image_file: cannot format {image_file!r} with image_id={image_id!r} ({error})") from None
    return Path(image_root) / name


def run_caption(generate, annotations, image_root, *, prompt: str = "Describe this image in one sentence.",
                split: str | None = "test", batch_size: int = 16, report=None,
                show_progress: bool = True, skip_bad_inputs: bool = False) -> dict:
    """Captioning metrics of `generate` on a COCO captions JSON (or a Karpathy split JSON).

    Generated and reference captions are tokenised with `tokenize_caption` (lower case,
    punctuation dropped), then scored corpus-wide: BLEU-1..4, CIDEr-D, ROUGE-L. The report
    holds the metrics and the predictions ([{"image_id", "caption"}]).
    """
    if not callable(generate):
        raise TypeError(f"generate: expected a callable (images, prompts) -> captions, got {type(generate).__name__}")
    batch_size = _batch_size(batch_size)
    data = load_captions(annotations, image_root, split=split)
    items, failed = _readable(list(zip(data.image_ids, data.paths, data.captions)), lambda item: item[1],
                              lambda item: f"annotations image {item[0]!r}", skip_bad_inputs, show_progress)
    predictions, candidates, references = [], [], []
    for batch in _batches(items, batch_size, "caption", show_progress):
        images = [open_rgb(path, f"annotations image {image_id!r}") for image_id, path, _ in batch]
        captions = _generate(generate, images, [prompt] * len(batch), "captions")
        for (image_id, _, refs), caption in zip(batch, captions):
            predictions.append({"image_id": image_id, "caption": caption})
            candidates.append(tokenize_caption(caption))
            references.append([tokenize_caption(r) for r in refs])
    scores = bleu(candidates, references, n=4)
    return _write(
        {
            "task": "caption",
            "annotations": os.fspath(annotations),
            "num_images": len(candidates),
            **{f"BLEU-{n + 1}": s for n, s in enumerate(scores)},
            "CIDEr-D": cider_d(candidates, references),
            "ROUGE-L": rouge_l(candidates, references),
            "predictions": predictions,
            "failed": failed,
        },
        report,
    )
