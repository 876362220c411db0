"""The text side every vision-language processor shares (SmolVLM, Qwen2-VL, LLaVA, BLIP-2): a
checkpoint's tokenizer.json (through `tokenizers`, no transformers), its special tokens, its chat
template, padding and decoding.

A subclass adds the images: which image processor, how each image's tokens are written into the
prompt, and what it returns (see processing/llava.py, processing/blip2.py,
processing/qwen2vl_processor.py, models/smolvlm/processor.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vlmfast.processing.tokenizer_files import (
    SPECIAL_TOKEN_NAMES, load_tokenizer, read_chat_template, read_json, read_special_tokens,
)

# transformers' `{% generation %}` block marks assistant text for training masks; rendering a
# prompt it is a plain block (transformers renders its body unchanged when not tracking).
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def strip_generation_tags(template: str) -> str:
    return _GENERATION_TAG.sub("", template)


class PromptProcessor:
    """tokenizer: a `tokenizers.Tokenizer`; image_token: the text of the image placeholder (in
    its vocabulary); pad_token: the padding token's text (None: rows must have one length);
    special_tokens: bos/eos/pad/unk texts for the chat template; padding_side: "left" (what
    batched generation needs) or "right" (training)."""

    def __init__(self, tokenizer: Tokenizer, image_processor=None, *, image_token: str = "<image>",
                 chat_template: str | None = None, pad_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, padding_side: str = "left"):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.special_tokens = dict(special_tokens or {})
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"tokenizer: the image token {image_token!r} is not in its vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = tokenizer.token_to_id(pad_token) if pad_token else None

    @staticmethod
    def read_text_side(path: Path) -> dict:
        """The keyword arguments of __init__ a checkpoint folder gives (tokenizer, template, tokens)."""
        tokenizer = load_tokenizer(path)
        special = read_special_tokens(path)
        pad_token = special.get("pad_token")
        if pad_token is None:
            pad_id = read_json(path / "config.json").get("text_config", {}).get("pad_token_id")
            pad_token = tokenizer.id_to_token(pad_id) if isinstance(pad_id, int) else None
        return dict(tokenizer=tokenizer, chat_template=read_chat_template(path), pad_token=pad_token,
                    special_tokens=special, image_token=special.get("image_token", "<image>"))

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **variables):
        """One conversation [{"role", "content": str | [{"type": "image"} | {"type": "text", "text"}]}]
        -> its prompt text; a list of conversations -> a list of texts (jinja2, sandboxed, as
        transformers renders them)."""
        from vlmfast.models.smolvlm.chat_template import render_chat_template

        template = self._chat_template_for(messages, chat_template)
        if template is None:
            raise ValueError("chat_template: the checkpoint has none (chat_template.jinja / .json / "
                             "tokenizer_config.json); pass chat_template=")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages: expected a conversation (a non-empty list of {'role', 'content'} dicts) "
                            "or a list of conversations")
        batched = isinstance(messages[0], (list, tuple))
        conversations = messages if batched else [messages]
        special = {k: v for k, v in self.special_tokens.items() if k in SPECIAL_TOKEN_NAMES}
        template = strip_generation_tags(template)
        texts = [render_chat_template(template, list(c), add_generation_prompt=add_generation_prompt,
                                      **special, **variables) for c in conversations]
        return texts if batched else texts[0]

    def _chat_template_for(self, messages, chat_template: str | None) -> str | None:
        """The template apply_chat_template renders `messages` with (a subclass may pick another)."""
        return chat_template or self.chat_template

    # ------------------------------------------------------------------ encoding, padding

    def encode(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (with the tokenizer's post-processor when add_special_tokens)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def pad(self, rows: list[list[int]], *, valid: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ids -> input_ids, attention_mask int64 (B, L), padded on padding_side with the
        pad token. valid: per row its attention-mask values (default all 1)."""
        L = max(len(r) for r in rows)
        if any(len(r) != L for r in rows) and self.pad_token_id is None:
            raise ValueError("text: rows of different lengths and the tokenizer has no pad_token to pad them with")
        ids = torch.full((len(rows), L), self.pad_token_id or 0, dtype=torch.int64)
        mask = torch.zeros((len(rows), L), dtype=torch.int64)
        for b, row in enumerate(rows):
            span = slice(L - len(row), L) if self.padding_side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row, dtype=torch.int64)
            mask[b, span] = torch.tensor(valid[b], dtype=torch.int64) if valid is not None else 1
        return ids, mask

    @staticmethod
    def texts(text) -> list[str]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text: expected a string or a non-empty list of strings")
        return list(texts)

    # ------------------------------------------------------------------ decoding

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        """ids: int (B, T) tensor or a list of lists."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode_batch([list(r) for r in ids], skip_special_tokens=skip_special_tokens)
