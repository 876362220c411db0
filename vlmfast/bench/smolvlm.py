"""SmolVLM: prefill and decode of vlmfast against transformers' generate, same random-weight
model (a transformers SmolVLMForConditionalGeneration saved and loaded into vlmfast), with
SmolVLM2-256M's dimensions (quick: a 2-layer toy of the same structure).

Cases (TARGETS.md): prefill of one 512 x 512 image (64 image tokens) + a prompt at batch 1;
generate of 32 new tokens for that image + prompt, end to end; prefill of a 2048-px image as
SmolVLM2's processor splits it (16 tiles of 512 px + the global one: 1088 image tokens); and
decode at batch 1 and 32. Decode time per step = (generate of N tokens - generate of 1 token) /
(N - 1): the prompt, the first token and start-up cancel, for both implementations alike. Each
Result's ms is per step (decode) or per call (prefill); extra holds tokens/s of both.
Peak memory: each implementation loads the saved checkpoint and generates 16 tokens for the
prefill's image + prompt in a fresh process (memory_case.py); peak_mib is that process's peak
resident set, loading included (extra: the peer's, and both after imports only).
"""

import tempfile

import torch

from vlmfast.bench.decode_case import decode_case
from vlmfast.bench.memory_case import memory_case
from vlmfast.bench.timing import Result, interleaved_ms
from vlmfast.models.smolvlm import SmolVLM

IMAGE_TOKEN = 49190
# SmolVLM2-256M-Video-Instruct's dimensions
FULL = dict(
    text_config=dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, pad_token_id=2,
                     tie_word_embeddings=False),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16),
    scale_factor=4, image_token_id=IMAGE_TOKEN,
)
QUICK = dict(
    text_config=dict(vocab_size=49280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=64, patch_size=16),
    scale_factor=2, image_token_id=IMAGE_TOKEN,
)


def build_pair(spec: dict, device, dtype):
    """(transformers model, vlmfast model) with the same random weights, both in dtype on device."""
    import transformers
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar in the table
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(SmolVLMConfig(**spec)).to(dtype).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = SmolVLM.from_pretrained(path, device=device, dtype=dtype)
    return hf.to(device), ours


def prompt(batch: int, text: int, image_tokens: int, device, seed=0):
    """Left-padded prompts: row b has b % 4 fewer text tokens (padding) and, when image_tokens,
    the image tokens after the first 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    L = text + image_tokens
    ids = torch.randint(3, 49000, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(batch):
        mask[b, : b % 4] = 0
    ids[mask == 0] = 2
    if image_tokens:
        ids[:, 5 + 3 : 5 + 3 + image_tokens] = IMAGE_TOKEN
    return ids.to(device), mask.to(device)


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    spec = QUICK if quick else FULL
    hf, ours = build_pair(spec, device, dtype)
    vision = spec["vision_config"]
    size = vision["image_size"]
    image_tokens = (size // vision["patch_size"] // spec["scale_factor"]) ** 2
    n_new = 4 if quick else 17
    repeats = dict(warmup=0, repeats=1) if quick else dict(warmup=1, repeats=3)
    name = str(dtype).removeprefix("torch.")
    results = []

    # prefill: one image + a prompt, batch 1
    ids, mask = prompt(1, 20, image_tokens, device)
    pixels = torch.randn(1, 1, 3, size, size, device=device, dtype=dtype)
    cache = ours.new_cache(1, ids.shape[1] + n_new)

    def ours_prefill():
        with torch.inference_mode():
            cache.reset()
            ours.prefill(ids, pixels, None, mask.bool(), cache)

    def hf_prefill():
        with torch.inference_mode():
            hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True, logits_to_keep=1)

    ms, peer_ms = interleaved_ms(ours_prefill, hf_prefill, device, **repeats)
    results.append(Result("smolvlm", f"prefill b=1 1 image ({image_tokens} tokens) + {ids.shape[1] - image_tokens} "
                          f"text {name}", "vlmfast", ms, "transformers", peer_ms))
    if device.type == "cpu":
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            results.append(memory_case("smolvlm", folder, {"input_ids": ids, "attention_mask": mask,
                                                           "pixel_values": pixels}, dtype,
                                       new_tokens=4 if quick else 16))

    # 1 image + prompt + 32 new tokens, end to end (generate: vision tower, prefill, decode)
    new = 4 if quick else 32
    gen_cache = ours.new_cache(1, ids.shape[1] + new)

    def ours_generate():
        return ours.generate(ids, pixels, None, mask, max_new_tokens=new, eos_token_id=[], cache=gen_cache)

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=2)

    ms, peer_ms = interleaved_ms(ours_generate, hf_generate, device, **repeats)
    same = torch.equal(ours_generate(), hf_generate()) if dtype == torch.float32 else None
    results.append(Result("smolvlm", f"generate b=1 1 image + {ids.shape[1] - image_tokens} text + {new} new {name}",
                          "vlmfast", ms, "transformers", peer_ms,
                          extra={"tokens_per_s": new * 1e3 / ms, "peer_tokens_per_s": new * 1e3 / peer_ms,
                                 "greedy_equal": same}))

    # a 2048-px image: SmolVLM2's processor splits it into 4 x 4 tiles of 512 px + a global one
    tiles = 2 if quick else 17
    big_ids, big_mask = prompt(1, 20, tiles * image_tokens, device, seed=1)
    big_pixels = torch.randn(1, tiles, 3, size, size, device=device, dtype=dtype)
    big_cache = ours.new_cache(1, big_ids.shape[1] + 1)

    def ours_big():
        with torch.inference_mode():
            big_cache.reset()
            ours.prefill(big_ids, big_pixels, None, big_mask.bool(), big_cache)

    def hf_big():
        with torch.inference_mode():
            hf(input_ids=big_ids, attention_mask=big_mask, pixel_values=big_pixels, use_cache=True, logits_to_keep=1)

    big_repeats = dict(warmup=0, repeats=1) if quick else dict(warmup=1, repeats=2)
    ms, peer_ms = interleaved_ms(ours_big, hf_big, device, **big_repeats)
    results.append(Result("smolvlm", f"prefill b=1 {tiles} tiles ({tiles * image_tokens} tokens) + 20 text {name}",
                          "vlmfast", ms, "transformers", peer_ms))

    # decode, text prompts (the image only changes the prefill)
    for batch in (1, 32) if not quick else (1, 3):
        ids, mask = prompt(batch, 32, 0, device, seed=batch)
        results.append(decode_case("smolvlm", ours, hf, ids, mask, pad_token_id=2, n_new=n_new, device=device,
                                   dtype=dtype, repeats=repeats))
    return results

