"""What a checkpoint folder says about its text side, read where transformers reads it: the
tokenizer (tokenizer.json, through `tokenizers`), its special tokens (tokenizer_config.json) and
the chat template. Every vision-language processor (SmolVLM, Qwen2-VL, LLaVA, BLIP-2) reads
its folder through these."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_json(file: Path) -> dict:
    """A JSON object file's content; {} where the file is missing or holds no object."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    return value if isinstance(value, dict) else {}


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template, where transformers looks for it: chat_template.jinja,
    chat_template.json {"chat_template": ...}, processor_config.json, tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = read_json(path / name).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def read_special_tokens(path: Path) -> dict[str, str]:
    """bos/eos/pad/unk and transformers 5's extra_special_tokens (image_token, ...) of tokenizer_config.json."""
    settings = read_json(path / "tokenizer_config.json")
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = token_text(settings.get(name))
        if text is not None:
            special[name] = text
    extra = settings.get("extra_special_tokens") or {}
    if isinstance(extra, dict):  # transformers 5 names the multimodal tokens here
        special.update({k: t for k, v in extra.items() if (t := token_text(v)) is not None})
    return special


def load_tokenizer(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"path: expected tokenizer.json in {path} (slow-tokenizer-only checkpoints are not supported)")
    return Tokenizer.from_file(str(path / "tokenizer.json"))
