"""CLIP tokenization through `tokenizers` equals transformers' CLIPTokenizer (built offline from a
small BPE vocabulary trained here), on hard strings; word tokenizer of the demo."""

import json

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from vlmfast.models.tokenizer import CLIP_BOS, CLIP_EOS, clip_bpe, load_tokenizer, word_tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "a photo of a cat", "a photo of a dog", "two dogs playing in the snow", "A RED CIRCLE!",
    "the quick brown fox jumps over the lazy dog", "it's a bird, it's a plane", "numbers 1 2 3 and 42",
    "café crème brûlée", "東京 タワー", "emoji 🙂 test", "don't won't I'll we've",
]
HARD = [
    "", " ", "A Photo OF a CAT", "Café  Crème\tbrûlée\n", "東京タワー 🙂🙂", "it's ... ?!?! -- ((x))",
    "word " * 120, "supercalifragilisticexpialidocious" * 10, "I'LL   we'VE", "1234567890", "ﬁ ligature Ⅻ",
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """vocab.json + merges.txt of a byte-level BPE trained on SENTENCES with CLIP's pipeline, plus
    the tokenizer.json transformers writes for it."""
    path = tmp_path_factory.mktemp("cliptok")
    model = BPE(unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix="</w>")
    tok = Tokenizer(model)
    reference = clip_bpe({CLIP_BOS: 0, CLIP_EOS: 1}, [])
    tok.normalizer, tok.pre_tokenizer = reference.normalizer, reference.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[CLIP_BOS, CLIP_EOS], end_of_word_suffix="</w>",
        initial_alphabet=alphabet + [c + "</w>" for c in alphabet], show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    tok.model.save(str(path))
    hf = transformers.CLIPTokenizer.from_pretrained(str(path))
    assert len(hf.get_vocab()) > 300, "transformers did not read the trained vocabulary"
    (path / "fast").mkdir()
    hf.save_pretrained(path / "fast")
    return path, hf


def _theirs(hf, texts, max_length=77):
    return hf(texts, truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("source", ["vocab_merges", "tokenizer_json"])
def test_clip_tokenizer_equals_transformers(clip_dir, source):
    path, hf = clip_dir
    ours = load_tokenizer(path if source == "vocab_merges" else path / "fast", context_length=77)
    assert ours.encode(HARD) == _theirs(hf, HARD)


def test_clip_truncation_keeps_the_end_token_and_pads_with_a_mask(clip_dir):
    path, hf = clip_dir
    ours = load_tokenizer(path, context_length=77)
    eos = hf.convert_tokens_to_ids(CLIP_EOS)
    ids, mask = ours(["word " * 120, "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[0, -1].item() == eos and ids[0, 0].item() == hf.convert_tokens_to_ids(CLIP_BOS)
    assert mask[0].all() and mask[1].sum().item() == len(_theirs(hf, ["a cat"])[0])
    short = load_tokenizer(path, context_length=5)
    assert short.encode(["a photo of a cat dog"]) == _theirs(hf, ["a photo of a cat dog"], max_length=5)


def test_clip_lower_cases(clip_dir):
    tok = load_tokenizer(clip_dir[0])
    assert tok.encode(["A PHOTO Of A Cat"]) == tok.encode(["a photo of a cat"])


def test_siglip_style_checkpoint_pads_to_the_context(clip_dir, tmp_path):
    path, _ = clip_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / "fast" / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "text_config": {"max_position_embeddings": 16}}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ids, mask = load_tokenizer(tmp_path)(["a cat"])
    assert ids.shape == (1, 16) and mask.sum().item() < 16


def test_word_tokenizer_round_trip(tmp_path):
    tok = word_tokenizer(["a", "red", "circle"], context_length=6)
    ids, mask = tok(["A red circle", "a blue circle"])
    assert ids[0].tolist() == [2, 4, 6, 5, 3] and ids[1].tolist() == [2, 4, 1, 5, 3]  # blue is <unk>
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert torch.equal(again(["A red circle", "a blue circle"])[0], ids)


def test_missing_tokenizer_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="texts"):
        word_tokenizer(["a"], context_length=4)([1, 2])
