"""Image-text instruction data: a JSONL file in transformers' chat format, one example a line,
and the built-in example set (shapes and colours) written as such a file.

    {"images": ["img/0.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]}

Image paths are relative to the JSONL file's folder (absolute paths are kept). A message's content
may also be a plain string (one text part). Problems are reported in one ValueError that names the
file, the line and the field of each (every line is read; images are checked to exist, not
decoded); `check_images` then decodes every image once, so that a corrupt file is found before the
first training step rather than at the step that draws it.

    examples = read_instructions("train.jsonl")          # list[InstructionExample]
    path = write_instruction_examples("data/", n=64)      # data/train.jsonl + data/images/*.png
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmfast import _jsonl
from vlmfast.data.synthetic import SyntheticShapes

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class InstructionExample:
    """One conversation. images: absolute paths in placeholder order; messages: content always a
    list of {"type": "image"} / {"type": "text", "text": str} parts; source: "file:line"."""

    images: tuple[Path, ...]
    messages: tuple[dict, ...]
    source: str

    def load_images(self) -> list[Image.Image]:
        """Upright RGB images, decoded as vlmfast's pipeline decodes them (EXIF orientation,
        palette / alpha / grey -> RGB); ValueError naming file:line for one that cannot be read."""
        from vlmfast.processing.loading import load_image

        out = []
        for i, path in enumerate(self.images):
            try:
                out.append(load_image(path))
            except ValueError as err:
                raise ValueError(f"{self.source}: images[{i}]: {err}") from err
        return out


def _parts(content, where: str) -> list[dict]:
    """content -> a list of parts; a plain string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}: expected a string or a non-empty list of parts, got {content!r}")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
            raise ValueError(f"{where}[{j}]: expected {{'type': 'image'}} or {{'type': 'text', 'text': str}}, "
                             f"got {part!r}")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}].text: expected a string, got {part.get('text')!r}")
            parts.append({"type": "text", "text": part["text"]})
        else:
            parts.append({"type": "image"})
    return parts


def _placeholders(parts: list[dict]) -> int:
    """<image> placeholders of a message: image parts and literal <image> in its texts."""
    return sum(1 if p["type"] == "image" else p["text"].count(IMAGE_PLACEHOLDER) for p in parts)


def parse_instruction(record, *, folder: Path, source: str) -> InstructionExample:
    """One decoded JSON line -> InstructionExample (validated). source: "file:line" for errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object with 'images' and 'messages', got {type(record).__name__}")
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError(f"{source}: images: expected a list of image paths (strings), got {images!r}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{source}: messages: expected a non-empty list of {{'role', 'content'}} objects, "
                         f"got {messages!r}")
    normalised, placeholders, answers = [], 0, 0
    for i, message in enumerate(messages):
        where = f"{source}: messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected an object with 'role' and 'content', got {message!r}")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}.role: expected one of {ROLES}, got {role!r}")
        parts = _parts(message["content"], f"{where}.content")
        if role == "assistant":
            if _placeholders(parts):
                raise ValueError(f"{where}.content: an assistant turn cannot hold images (it is the answer)")
            if not "".join(p["text"] for p in parts).strip():
                raise ValueError(f"{where}.content: the assistant's answer is empty")
            answers += 1
        placeholders += _placeholders(parts)
        normalised.append({"role": role, "content": parts})
    if answers == 0:
        raise ValueError(f"{source}: messages: no assistant turn (nothing to learn from); expected at least one "
                         "{'role': 'assistant', ...}")
    if placeholders != len(images):
        raise ValueError(f"{source}: images: {len(images)} image(s) but {placeholders} <image> placeholder(s) in "
                         "messages (one {'type': 'image'} part per image, in order)")
    paths = []
    for k, name in enumerate(images):
        path = Path(name) if os.path.isabs(name) else folder / name
        if not path.is_file():
            raise ValueError(f"{source}: images[{k}]: no such file {path}")
        paths.append(path.resolve())
    return InstructionExample(tuple(paths), tuple(normalised), source)


MAX_LISTED_PROBLEMS = 20


def _problems(headline: str, problems: list[str]) -> ValueError:
    if len(problems) == 1:
        return ValueError(problems[0])
    lines = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return ValueError("\n".join([headline, *lines]))


def read_instructions(path: str | os.PathLike) -> list[InstructionExample]:
    """Every example of a JSONL file (blank lines skipped), validated; one ValueError names the
    file:line of every bad example."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {path}")
    examples, problems = [], []
    for source, record in _jsonl.records(path, errors=problems):
        try:
            examples.append(parse_instruction(record, folder=path.parent, source=source))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise _problems(f"data: {len(problems)} bad example(s) in {path}:", problems)
    if not examples:
        raise ValueError(f"data: {path} holds no examples")
    return examples


def check_images(examples: list[InstructionExample], *, show_progress: bool = False) -> None:
    """Decodes every distinct image of `examples` once (threads); one ValueError naming the
    file:line, the image and the reason of every one that cannot be read."""
    from vlmfast.eval._progress import Progress
    from vlmfast.models.image_inputs import read_images

    paths = list(dict.fromkeys(str(p) for example in examples for p in example.images))
    bad = {}
    with Progress(len(paths), "checking images", unit="images", enabled=show_progress) as bar:
        for start in range(0, len(paths), 64):
            bad.update(read_images(paths[start:start + 64])[2])
            bar.update(len(paths[start:start + 64]))
    problems = [f"{example.source}: images[{k}]: {image}: {bad[str(image)]}"
                for example in examples for k, image in enumerate(example.images) if str(image) in bad]
    if problems:
        raise _problems(f"data: {len(problems)} image(s) cannot be read:", problems)


# ----------------------------------------------------------------------------- built-in examples

def shape_questions(attributes: dict) -> dict[str, tuple[str, str]]:
    """kind -> (question, answer) about one shape image (SyntheticShapes' attributes); the
    built-in examples ask these, and `vlmfast demo vlm` asks the same on held-out images."""
    colour, shape, size, position = (attributes[k] for k in ("colour", "shape", "size", "position"))
    return {
        "shape": ("What shape is this?", f"A {colour} {shape}."),
        "colour": ("What colour is the shape?", f"{colour.capitalize()}."),
        "description": ("Describe the image.", f"A {size} {colour} {shape} {position}."),
        "position": ("Where is the shape?", f"{position.capitalize()}."),
    }


def _conversation(attributes: dict, variant: int) -> list[dict]:
    """Questions about one shape image; every third example has a follow-up turn (two answers)."""
    size = attributes["size"]
    questions = tuple(shape_questions(attributes).values())
    question, answer = questions[variant % len(questions)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    if variant % 3 == 2:
        messages += [
            {"role": "user", "content": [{"type": "text", "text": "How big is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {size}."}]},
        ]
    return messages


def write_instruction_examples(folder: str | os.PathLike, n: int = 64, *, seed: int = 0, image_size: int = 32,
                               name: str = "train.jsonl") -> Path:
    """Writes n instruction examples about vlmfast.data.synthetic's shapes: folder/images/NNNNN.png
    and folder/<name> (JSONL). Deterministic in (n, seed, image_size). Returns the JSONL path."""
    if n < 1:
        raise ValueError(f"n: expected at least 1 example, got {n}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes(n, image_size=image_size, seed=seed)
    lines = []
    for i in range(n):
        sample = shapes[i]
        image_name = f"images/{i:05d}.png"
        Image.fromarray(sample.image).save(folder / image_name)
        record = {"images": [image_name], "messages": _conversation(sample.attributes, i)}
        lines.append(json.dumps(record))
    target = folder / name
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target


def data_sha256(path: str | os.PathLike, examples: list[InstructionExample]) -> str:
    """One hash over the JSONL file and the bytes of every image it names: a resumed fine-tuning
    run checks it to be sure it continues on the same data."""
    import hashlib

    from vlmfast.models.fingerprint import file_sha256

    digest = hashlib.sha256(Path(path).read_bytes())
    for image in dict.fromkeys(p for example in examples for p in example.images):
        digest.update(file_sha256(image).encode())
    return digest.hexdigest()
