"""The command line's argument checks, one layer for every subcommand.

Each checker is an argparse `type=` callable: it turns the text into the value or raises
argparse.ArgumentTypeError with a message that says what was expected, and argparse prints
`vlmfast CMD: error: argument --flag: <message>` and exits with status 2 before any work starts.
Checks that involve two flags (--top-k against the labels) raise `usage_error`, which the
`vlmfast` entry point prints the same way with the same status.

    p.add_argument("--batch-size", type=cli_args.positive_int, default=64)
    p.add_argument("--device", type=cli_args.device, default=None)
    p.add_argument("--labels", type=cli_args.labels, required=True)
"""

from __future__ import annotations

import argparse
import json
import os
import string
from pathlib import Path

Invalid = argparse.ArgumentTypeError

# Suffixes that make a --labels / --templates value a file name rather than a list of names.
LIST_FILE_SUFFIXES = (".txt", ".json", ".csv", ".tsv", ".lst", ".list", ".labels")


class UsageError(ValueError):
    """A bad combination of flags; the entry point prints it as argparse would (status 2)."""


def usage_error(flag: str, message: str) -> UsageError:
    return UsageError(f"argument {flag}: {message}")


# ----------------------------------------------------------------------------- numbers

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise Invalid(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Invalid(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise Invalid(f"expected a positive integer (1 or more), got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise Invalid(f"expected 0 or a positive integer, got {value}")
    return value


def int_in(low: int, high: int, what: str = ""):
    """An int in [low, high]; `what` names the unit in the message ("bits")."""
    def check(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            unit = f" {what}" if what else ""
            raise Invalid(f"expected an integer from {low} to {high}{unit}, got {value}")
        return value
    check.__name__ = f"int_in_{low}_{high}"
    return check


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise Invalid(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise Invalid(f"expected 0 or a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (dropout)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise Invalid(f"expected a number from 0 up to (not including) 1, got {text}")
    return value


# ----------------------------------------------------------------------------- paths

def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise Invalid(f"no such folder: {text}")
    if not path.is_dir():
        raise Invalid(f"expected a folder, {text} is a file")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise Invalid(f"no such file: {text}")
    if not path.is_file():
        raise Invalid(f"expected a file, {text} is a folder")
    return path


def existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise Invalid(f"no such file or folder: {text}")
    return path


def checkpoint_dir(text: str) -> Path:
    """A model folder in Hugging Face layout: it must hold config.json."""
    path = existing_dir(text)
    if not (path / "config.json").is_file():
        raise Invalid(f"expected a checkpoint folder with config.json (Hugging Face layout), {text} has none")
    return path


def _checkpoint_of(text: str, description: str, model_types) -> Path:
    path = checkpoint_dir(text)
    try:
        kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise Invalid(f"{text}: config.json is not a JSON object ({error})") from None
    if kind not in model_types:
        raise Invalid(f"expected {description} checkpoint, {text}/config.json says model_type={kind!r} "
                      f"(this command reads {', '.join(sorted(model_types))})")
    return path


def clip_checkpoint(text: str) -> Path:
    """--model of embed, zeroshot, eval zeroshot / retrieval: a CLIP or SigLIP checkpoint folder."""
    return _checkpoint_of(text, "a CLIP or SigLIP", ("clip", "siglip"))


# The vision-language families --model of generate, eval vqa / caption and finetune takes, as its
# help names them (the model_types of vlmfast.pipelines.FAMILIES and vlmfast.train.finetune.MODEL_TYPES).
VLM_FAMILIES = "SmolVLM / SmolVLM2 / Idefics3, Qwen2-VL / Qwen2.5-VL, LLaVA-1.5 or BLIP-2 (OPT)"


def vlm_checkpoint(text: str) -> Path:
    """--model of generate, eval vqa / caption: a checkpoint of a family with an image-text-to-text
    pipeline (vlmfast.pipelines.FAMILIES)."""
    from vlmfast.pipelines import FAMILIES

    return _checkpoint_of(text, "a vision-language", tuple(FAMILIES))


def finetune_checkpoint(text: str) -> Path:
    """--model of finetune: a family the fine-tuning collates (vlmfast.train.finetune.MODEL_TYPES)."""
    from vlmfast.train.finetune import MODEL_TYPES

    return _checkpoint_of(text, "a vision-language", MODEL_TYPES)


def output_dir(text: str) -> Path:
    """A folder to write into: missing (created later, once the work can start) or a folder."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise Invalid(f"expected a folder to write into, {text} is a file")
    return path


def output_file(text: str) -> Path:
    """A file to write (a report): not a folder, and not inside a file."""
    path = Path(text)
    if path.is_dir():
        raise Invalid(f"expected a file name to write, {text} is a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise Invalid(f"cannot write {text}: {parent} is a file, not a folder")
    return path


# ----------------------------------------------------------------------------- devices

def device(text: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N (N < the GPU count), mps."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise Invalid(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only torch" if torch.version.cuda is None else "no usable GPU"
            raise Invalid(f"{text}: CUDA is not available here ({built}, torch {torch.__version__}); "
                          "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise Invalid(f"{text}: there are {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise Invalid(f"{text}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise Invalid(f"expected cpu, cuda[:N] or mps, got {text!r}")
    return text


# ----------------------------------------------------------------------------- labels, templates

def _looks_like_file(text: str) -> bool:
    # a template holds a placeholder; a file name does not
    return "{" not in text and (os.sep in text or "/" in text or text.lower().endswith(LIST_FILE_SUFFIXES))


def _names_from_file(path: Path, flag_value: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"{flag_value}: not a UTF-8 text file (one name per line, or a JSON list)") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        return _json_names(text, f"{flag_value}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix.lower() == ".csv":  # comma-separated values, on one line or several
        return [cell.strip() for line in lines for cell in line.split(",") if cell.strip()]
    return lines


def _json_names(text: str, where: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise Invalid(f"{where}: not a JSON list of strings ({error.msg} at line {error.lineno} "
                      f"column {error.colno})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"{where}: expected a JSON list of strings, got {type(value).__name__}"
                      + ("" if not isinstance(value, list) else " with non-string items"))
    return [v.strip() for v in value]


def name_list(text: str, separator: str, kind: str) -> list[str]:
    """A list given inline (`separator`-separated, or a JSON list) or as a file (one per line, or
    a JSON list). A value that names a file that is not there is an error, never one name."""
    stripped = text.strip()
    if stripped.startswith("["):
        names = _json_names(stripped, "the JSON list")
    elif Path(text).is_file():
        names = _names_from_file(Path(text), text)
    elif Path(text).is_dir():
        raise Invalid(f"{text} is a folder; expected {kind} or a file of them")
    elif separator not in text and _looks_like_file(text):
        raise Invalid(f"no such file: {text} (expected {kind} separated by {separator!r}, or a file of them)")
    else:
        names = [item.strip() for item in text.split(separator)]
    if any(not name for name in names):
        names = [name for name in names if name]
    if not names:
        raise Invalid(f"expected {kind}, got none")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise Invalid(f"each name once, got {', '.join(repr(d) for d in duplicates)} more than once")
    return names


def labels(text: str) -> list[str]:
    """--labels: class names "a,b,c", a JSON list, or a file (one name per line, or JSON)."""
    names = name_list(text, ",", "class names")
    if len(names) < 2:
        raise Invalid(f"expected at least two class names to choose between, got only {names[0]!r} "
                      "(a misspelt file name? a file must exist; names are comma-separated)")
    return names


def template(text: str) -> str:
    """One prompt template with exactly one placeholder for the class name: {} (or {label})."""
    normalised = text.replace("{label}", "{}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(normalised) if field is not None]
    except ValueError as error:
        raise Invalid(f"{text!r}: not a valid template ({error}); write {{{{ and }}}} for literal braces") from None
    if fields != [""]:
        found = "no placeholder" if not fields else f"placeholders {fields}"
        raise Invalid(f"{text!r}: expected exactly one {{}} (or {{label}}) where the class name goes, found {found}")
    return normalised


def templates(text: str) -> list[str]:
    """--templates: '|'-separated templates, a JSON list, or a file (one per line, or JSON)."""
    return [template(t) for t in name_list(text, "|", "prompt templates")]


def fills(**samples):
    """A str.format template that must use each named field and nothing else, e.g.
    fills(question="q") for a VQA prompt, fills(image_id=1) for "COCO_{image_id:012d}.jpg"."""
    def check(text: str) -> str:
        try:
            used = {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(text)
                    if field is not None}
            text.format(**samples)
        except (ValueError, KeyError, IndexError, AttributeError) as error:
            raise Invalid(f"{text!r}: cannot be filled with {', '.join('{' + k + '}' for k in samples)} "
                          f"({type(error).__name__}: {error}); write {{{{ and }}}} for literal braces") from None
        missing = [name for name in samples if name not in used]
        if missing:
            raise Invalid(f"{text!r}: expected {', '.join('{' + m + '}' for m in missing)} in it")
        return text
    check.__name__ = "template_with_" + "_".join(samples)
    return check
