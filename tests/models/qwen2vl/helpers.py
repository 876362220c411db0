"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints written offline: a byte-level BPE tokenizer.json trained
here with Qwen2-VL's special tokens, tokenizer_config.json, the Instruct checkpoints' chat
template, preprocessor_config.json (small pixel limits), and random weights saved by transformers
(2 decoder layers of width 64 with GQA; a vision tower of width 32 with 2 heads; Qwen2.5-VL with
56-pixel windows, i.e. 2 x 2 merged tokens, and full attention in block 1 of 3)."""

import json
from pathlib import Path

import torch

VERSIONS = ("qwen2_vl", "qwen2_5_vl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["system You are a helpful assistant.", "user What is in this image? assistant A cat on a red mat.",
          "Describe this picture in one sentence.", "How many dogs are there? Two dogs on the grass.",
          "What happens in the video? A man rides a horse along the beach."]
# The Qwen2-VL / Qwen2.5-VL Instruct checkpoints' chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16  # images of 4 to ~64 patches
PATCH_DIM = 3 * 2 * 14 * 14


def train_tokenizer(vocab_size: int = 360):
    from vlmfast.processing.tokenizer_training import train_byte_level_bpe

    return train_byte_level_bpe(CORPUS * 4, SPECIAL_TOKENS, vocab_size=vocab_size)


def token_ids(tok) -> dict:
    return dict(image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
                vision_start_token_id=tok.token_to_id("<|vision_start|>"),
                vision_end_token_id=tok.token_to_id("<|vision_end|>"))


def write_processor_files(path, version: str = "qwen2_vl") -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "padding_side": "left", "model_max_length": 32768}, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    processor = "Qwen2VLProcessor" if version == "qwen2_vl" else "Qwen2_5_VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}, indent=2))
    return path


def hf_config(version: str, vocab_size: int = 360, ids: dict | None = None, *, tied: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=2, pad_token_id=0)
    ids = ids or dict(image_token_id=vocab_size - 2, video_token_id=vocab_size - 1,
                      vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3)
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=56,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)


def hf_model(version: str, seed: int = 0, **options):
    """transformers' model with random weights, norms away from 1 (a missing weight would show)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cls = Qwen2VLForConditionalGeneration if version == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(hf_config(version, **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif ("norm" in name or "ln_q" in name) and name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def write_checkpoint(path, version: str = "qwen2_vl", *, seed: int = 0, tied: bool = False) -> Path:
    """A complete checkpoint folder: processor files + transformers-saved random weights whose
    vocabulary and special ids are the tokenizer's; generation stops at <|im_end|>."""
    from tokenizers import Tokenizer

    path = write_processor_files(path, version)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = hf_model(version, seed, vocab_size=tok.get_vocab_size(), ids=token_ids(tok), tied=tied)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": tok.token_to_id("<|endoftext|>")}))
    return path


def build_batch(config, rows, *, seed: int = 0, video: bool = False):
    """Left-padded prompts: per row a list of (t, h, w) patch grids, each written as
    <vision_start> + t*h*w/4 image (or video) tokens + <vision_end> between random text.
    config: transformers' config (for the ids). Returns input_ids, attention_mask, pixels
    (sum t*h*w, 1176), grid_thw (n, 3), mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    token = config.video_token_id if video else config.image_token_id
    text = lambda n: torch.randint(3, vocab - 8, (n,), generator=g)  # noqa: E731
    prompts, grids = [], []
    for r, row in enumerate(rows):
        parts = [text(2 + r)]
        for grid in row:
            n = grid[0] * grid[1] * grid[2] // 4
            parts += [torch.tensor([config.vision_start_token_id]), torch.full((n,), token),
                      torch.tensor([config.vision_end_token_id]), text(2)]
            grids.append(list(grid))
        parts.append(text(3))
        prompts.append(torch.cat(parts))
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = p, 1
    total = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(total, PATCH_DIM, generator=g)
    types = torch.zeros_like(ids)
    types[ids == config.image_token_id] = 1
    types[ids == config.video_token_id] = 2
    grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
    return ids, mask, (pixels if grids else None), grid_thw, types
