"""Text tokenizers for CLIP / SigLIP checkpoints through the `tokenizers` library (no transformers).

A checkpoint directory provides tokenizer.json (what transformers' fast tokenizers save), or, for
CLIP, the original vocab.json + merges.txt from which the CLIP pipeline is built here: NFC,
whitespace runs -> one space, lower-casing, CLIP's word split, byte-level BPE with "</w>" word
ends, and <|startoftext|> ... <|endoftext|> around every text. Texts longer than the context
(77 for CLIP) are truncated with the end token kept, which is where CLIP pools.

    tok = load_tokenizer("path/to/clip")
    input_ids, attention_mask = tok(["a photo of a cat", "a dog"])   # int64 (B, L), int64 (B, L)
"""

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordLevel

# CLIP's word split: special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


class TextTokenizer:
    """texts -> (input_ids int64 (B, L), attention_mask int64 (B, L)).

    L is the longest encoded text (pad_to_context=False, CLIP: its causal tower pools at the end
    token, padding changes nothing) or always context_length (pad_to_context=True, SigLIP: it pools
    the last position, so it must see the same padding it was trained with).
    """

    def __init__(self, tokenizer: Tokenizer, *, context_length: int, pad_id: int, pad_to_context: bool = False):
        if context_length < 2:
            raise ValueError(f"context_length: expected at least 2 (start and end tokens), got {context_length}")
        self.tokenizer = tokenizer
        self.context_length, self.pad_id, self.pad_to_context = context_length, pad_id, pad_to_context
        # Truncation counts the start/end tokens the post-processor adds, so the end token survives.
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.no_padding()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a string or a list of strings")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def __call__(self, texts, *, device=None):
        rows = self.encode(texts)
        L = self.context_length if self.pad_to_context else max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), L), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return ids.to(device), mask.to(device)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, path) -> None:
        """Writes tokenizer.json and a tokenizer_config.json that load_tokenizer reads back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.no_truncation()
        self.tokenizer.save(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.context_length)
        config = {
            "model_max_length": self.context_length,
            "pad_token": self.tokenizer.id_to_token(self.pad_id),
            "padding": "max_length" if self.pad_to_context else "longest",
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def clip_bpe(vocab: dict, merges: list) -> Tokenizer:
    """The CLIP tokenization pipeline around a byte-level BPE vocabulary."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=CLIP_EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _read_merges(file: Path) -> list[tuple[str, str]]:
    lines = file.read_text(encoding="utf-8").splitlines()
    pairs = [line.split() for line in lines if line and not line.startswith("#version")]
    return [(a, b) for a, b in pairs]


def word_tokenizer(words, *, context_length: int) -> TextTokenizer:
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) over `words`, with
    <pad>=0 <unk>=1 <bos>=2 <eos>=3. For small models trained from scratch (the demo)."""
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(w.lower() for w in words) - set(specials)))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return TextTokenizer(tok, context_length=context_length, pad_id=vocab["<pad>"])


def load_tokenizer(path, *, context_length: int | None = None) -> TextTokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json, or CLIP's vocab.json + merges.txt).

    context_length defaults to tokenizer_config.json's model_max_length, else to the text tower's
    max_position_embeddings in config.json. SigLIP checkpoints pad to the context length.
    """
    path = Path(path)
    settings = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    model = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    model_type = model.get("model_type", "")
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = clip_bpe(json.loads((path / "vocab.json").read_text(encoding="utf-8")), _read_merges(path / "merges.txt"))
    else:
        raise FileNotFoundError(
            f"path: expected tokenizer.json (or CLIP's vocab.json + merges.txt) in {path}; "
            "sentencepiece-only checkpoints (spiece.model) are not supported"
        )
    if context_length is None:
        limit = settings.get("model_max_length")
        positions = model.get("text_config", {}).get("max_position_embeddings")
        context_length = limit if isinstance(limit, int) and limit < 1_000_000 else positions or 77
    pad_token = settings.get("pad_token")
    if isinstance(pad_token, dict):  # older tokenizer_config.json store AddedToken dicts
        pad_token = pad_token.get("content")
    pad_id = tok.token_to_id(pad_token) if pad_token else None
    if pad_id is None:
        pad_id = model.get("text_config", {}).get("pad_token_id")
    if pad_id is None:
        pad_id = tok.token_to_id(CLIP_EOS) or 0
    pad_to_context = settings.get("padding") == "max_length" or model_type == "siglip"
    return TextTokenizer(tok, context_length=context_length, pad_id=pad_id, pad_to_context=pad_to_context)
