"""Tiny SmolVLM configurations and prompts with the right number of image tokens, shared by the
model and generation tests."""

import torch

from vlmfast.models.smolvlm import SmolVLM, SmolVLMConfig, SmolVLMTextConfig, SmolVLMVisionConfig

IMAGE_TOKEN = 199
VOCAB = 200
PAD = 0
IMAGE_SIZE, PATCH, SCALE = 32, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2  # 4 tokens per tile


def hf_config_dict(*, tied=False, model_type="smolvlm", kv_heads=2, head_dim=None) -> dict:
    """Keyword arguments of transformers' SmolVLMConfig / Idefics3Config for a tiny model with
    GQA (4 query heads over 2 kv heads) and a vision tower of 4 x 4 patches per tile."""
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, pad_token_id=PAD,
                tie_word_embeddings=tied)
    if head_dim is not None:
        text["head_dim"] = head_dim
    vision = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    return dict(text_config=text, vision_config=vision, scale_factor=SCALE, image_token_id=IMAGE_TOKEN,
                tie_word_embeddings=tied)


def tiny_model(seed=0, dtype=torch.float32, *, tied=False) -> SmolVLM:
    """The same tiny architecture built directly (random weights, no transformers)."""
    torch.manual_seed(seed)
    d = hf_config_dict(tied=tied)
    text = dict(d["text_config"])
    rope = text.pop("rope_parameters")
    cfg = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**d["vision_config"]),
        text_config=SmolVLMTextConfig(**text, rope_theta=rope["rope_theta"]),
        scale_factor=SCALE, image_token_id=IMAGE_TOKEN, tie_word_embeddings=tied,
    )
    model = SmolVLM(cfg, dtype=dtype).eval()
    with torch.no_grad():  # norms away from 1 so that a missing weight would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def build_batch(rows, *, length=None, seed=0):
    """rows: per row (images, text_before, text_after, pad_pixels) where images counts tiles
    (e.g. 5 = a 2 x 2 split + the global image) and pad_pixels (rows, cols) shrinks the last
    tile to that many valid pixels (zeros and a 0 pixel mask elsewhere) or is None.

    Returns input_ids (B, L) left-padded with PAD, attention_mask (B, L), pixel_values
    (B, N, 3, H, W) with all-zero padding images, pixel_attention_mask (B, N, H, W).
    """
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for images, before, after, _ in rows:
        text = lambda n: torch.randint(1, IMAGE_TOKEN, (n,), generator=g)  # noqa: E731
        prompts.append(torch.cat([text(before), torch.full((images * IMAGE_SEQ_LEN,), IMAGE_TOKEN), text(after)]))
    L = length or max(len(p) for p in prompts)
    B, N = len(rows), max(max(r[0] for r in rows), 1)
    input_ids = torch.full((B, L), PAD, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, L - len(p):] = p
        attention_mask[b, L - len(p):] = 1
    pixel_values = torch.zeros(B, N, 3, IMAGE_SIZE, IMAGE_SIZE)
    pixel_mask = torch.zeros(B, N, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    for b, (images, _, _, pad_pixels) in enumerate(rows):
        pixel_values[b, :images] = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        pixel_mask[b, :images] = 1
        if pad_pixels is not None and images:
            h, w = pad_pixels
            pixel_mask[b, images - 1] = 0
            pixel_mask[b, images - 1, :h, :w] = 1
            pixel_values[b, images - 1] *= pixel_mask[b, images - 1]
    return input_ids, attention_mask, pixel_values, pixel_mask
