"""Tiny BLIP-2 (OPT) checkpoint folders written offline: a byte-level BPE tokenizer.json with OPT's
special tokens (</s> put in front of every text by its post-processor, as OPT's tokenizer does)
and <image>, BLIP image processing of 32 x 32 images, and random weights saved by transformers'
Blip2ForConditionalGeneration, spread out so that a wrong weight shows in the logits."""

import json
from pathlib import Path

import torch

from tests.models.llava.checkpoint import CORPUS, spread_weights

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]  # OPT: pad 1, bos = eos = </s> 2
IMAGE_SIZE, PATCH, QUERIES = 32, 8, 6

LAYOUTS = {  # name: OPT and Q-Former options
    "pre-norm-tied": dict(do_layer_norm_before=True, tie_word_embeddings=True, cross_attention_frequency=2),
    "post-norm-untied": dict(do_layer_norm_before=False, tie_word_embeddings=False, cross_attention_frequency=1),
}


def train_tokenizer(vocab_size: int = 260):
    from tokenizers import processors

    from vlmfast.processing.tokenizer_training import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS * 4, SPECIAL_TOKENS, vocab_size=vocab_size, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def write_processor_files(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "model_max_length": 512,
    }, indent=2))  # no image_token entry: transformers' Blip2Processor then adds (finds) "<image>" itself
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Blip2Processor",
                                                            "num_query_tokens": QUERIES}))
    return path


def hf_config(tok, layout: str):
    from transformers import Blip2Config

    options = dict(LAYOUTS[layout])
    frequency = options.pop("cross_attention_frequency")
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
        qformer_config=dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=2, intermediate_size=72,
                            cross_attention_frequency=frequency),
        text_config=dict(model_type="opt", vocab_size=tok.get_vocab_size(), hidden_size=48, ffn_dim=80,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                         word_embed_proj_dim=48, pad_token_id=1, bos_token_id=2, eos_token_id=2, **options),
        num_query_tokens=QUERIES, image_token_index=tok.token_to_id("<image>"),
    )


def write_checkpoint(path, *, layout: str = "pre-norm-tied", seed: int = 0) -> Path:
    from tokenizers import Tokenizer
    from transformers import Blip2ForConditionalGeneration

    path = write_processor_files(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(hf_config(tok, layout))
    spread_weights(model, seed)
    model.save_pretrained(path)
    return path
