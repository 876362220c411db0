"""Tiny LLaVA checkpoint folders written offline: a byte-level BPE tokenizer.json trained here with
Llama's special tokens (<s> added in front of every text by its post-processor) and <image>, the
processor files (CLIP image processing of 32 x 32 images, patch 8: 16 patches), and random
weights saved by transformers' LlavaForConditionalGeneration, spread out so that a wrong weight
or a swapped layer shows in the logits."""

import json
from pathlib import Path

import torch

from vlmfast.processing.llava import LLAVA_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CORPUS = ["USER: What is in this image? ASSISTANT: A cat sitting on a red mat.",
          "Describe this image in one sentence.", "How many dogs are there? Two.",
          "A man riding a horse on the beach at sunset.", "Question: what colour is the car? Answer: blue"]
IMAGE_SIZE, PATCH = 32, 8


def train_tokenizer(vocab_size: int = 260, *, bos: str | None = "<s>"):
    from tokenizers import processors

    from vlmfast.processing.tokenizer_training import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS * 4, SPECIAL_TOKENS, vocab_size=vocab_size, unk_token="<unk>")
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights with some spread (transformers' init gives near-constant logits), norms
    away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def write_processor_files(path, *, strategy: str = "default", do_pad: bool = False) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "model_max_length": 4096,
        "extra_special_tokens": {"image_token": "<image>"},
    }, indent=2))
    (path / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaImageProcessor" if do_pad else "CLIPImageProcessor",
        "size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True, "resample": 3, "do_pad": do_pad,
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "patch_size": PATCH, "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": 1, "image_token": "<image>",
    }))
    return path


def hf_config(tok, *, strategy="default", feature_layer=-2, tied=False, kv_heads=2):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                         pad_token_id=tok.token_to_id("<pad>"), bos_token_id=tok.token_to_id("<s>"),
                         eos_token_id=tok.token_to_id("</s>"), tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
        image_token_index=tok.token_to_id("<image>"), vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy, tie_word_embeddings=tied,
    )


def write_checkpoint(path, *, seed=0, strategy="default", feature_layer=-2, tied=False, do_pad=False) -> Path:
    """A loadable LLaVA checkpoint folder with random weights (transformers' save_pretrained)."""
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration

    path = write_processor_files(path, strategy=strategy, do_pad=do_pad)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(tok, strategy=strategy, feature_layer=feature_layer, tied=tied))
    spread_weights(model, seed)
    model.save_pretrained(path)
    return path


def hf_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)
