"""A SmolVLM tokenizer trained here, offline, on a small corpus: what a tiny demo model needs
instead of a downloaded one.

    tokenizer = train_smolvlm_tokenizer(texts, vocab_size=512)
    write_tokenizer_files("ckpt/", tokenizer)   # tokenizer.json, tokenizer_config.json, chat_template.jinja

The tokenizer is byte-level BPE (GPT-2 style: any text encodes, decoding gives the text back
exactly, spaces included), whose merges are learnt from `texts`, plus SmolVLM's special tokens
as added tokens that are never split: the image markers the processor writes around each image
(<fake_token_around_image>, <global-img>, <image>, <row_r_col_c> for split images), <video>,
the turn markers of the chat template (<|im_start|>, <end_of_utterance>) and the padding token.
tokenizer_config.json names them where both vlmfast's SmolVLMProcessor and transformers'
tokenizer look (pad / eos tokens, extra_special_tokens for the multimodal ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmfast.models.smolvlm.processor import END_OF_UTTERANCE, VIDEO_CHAT_TEMPLATE
from vlmfast.processing.smolvlm_prompt import FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
MAX_TILE_GRID = 6  # <row_r_col_c> for r, c <= 6: images split into up to 6 x 6 tiles stay encodable
SPECIAL_TOKENS = (
    [PAD_TOKEN, TURN_START, END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN]
    + [f"<row_{r}_col_{c}>" for r in range(1, MAX_TILE_GRID + 1) for c in range(1, MAX_TILE_GRID + 1)]
)
# SmolVLM's chat template ("User: ...<end_of_utterance>\nAssistant: ..."); vlmfast's copy also
# renders string contents and videos.
CHAT_TEMPLATE = VIDEO_CHAT_TEMPLATE
_BYTES = 256  # byte-level BPE starts from one token per byte


def train_smolvlm_tokenizer(texts, *, vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE learnt from `texts` (an iterable of strings), with SPECIAL_TOKENS.

    vocab_size: the most tokens in all (bytes + merges + special tokens); the trainer stops
    earlier when the corpus has no pair left to merge, so small corpora give whole-word tokens."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: expected a non-empty list of strings to learn the merges from")
    smallest = _BYTES + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size <= smallest:
        raise ValueError(f"vocab_size: expected an int above {smallest} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size!r}")
    return train_byte_level_bpe(texts, SPECIAL_TOKENS, vocab_size=vocab_size)


def train_byte_level_bpe(texts, special_tokens, *, vocab_size: int, unk_token: str | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) whose merges are learnt from `texts`, with `special_tokens`
    as added tokens that are never split; unk_token: the model's unknown token (None: none, as
    byte-level BPE needs none)."""
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_tokenizer_files(folder: str | os.PathLike, tokenizer: Tokenizer, *,
                          chat_template: str = CHAT_TEMPLATE, model_max_length: int = 2048) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja in `folder` (created)."""
    for token in (PAD_TOKEN, END_OF_UTTERANCE, IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"tokenizer: expected SmolVLM's special token {token!r} in its vocabulary "
                             "(train it with train_smolvlm_tokenizer)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD_TOKEN,
        "eos_token": END_OF_UTTERANCE,  # generation stops at the end of the assistant's turn
        "padding_side": "left",  # batched generation pads on the left
        "model_max_length": model_max_length,
        "extra_special_tokens": {
            "image_token": IMAGE_TOKEN, "fake_image_token": FAKE_TOKEN, "global_image_token": GLOBAL_TOKEN,
            "end_of_utterance_token": END_OF_UTTERANCE, "video_token": VIDEO_TOKEN,
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder
