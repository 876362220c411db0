"""Qwen2-VL / Qwen2.5-VL: vlmfast against transformers (sdpa) on the same random weights, same
inputs, in the same run.

Cases:
- vision tower, 4 images of different sizes (224 x 224, 308 x 196, 448 x 336, 140 x 420 pixels:
  1632 patches) packed in one batch, for Qwen2-VL-2B's tower (width 1280, 16 heads, MLP 5120)
  and Qwen2.5-VL-3B's (width 1280, SwiGLU 3420, 112-pixel windows, full attention in the last
  block), 4 blocks each (a full tower is 32: times scale with the depth);
- the Qwen2-VL tower on one 784 x 784 image (3136 patches): an (S x S) float32 score matrix
  per head would be 38 MiB (x 16 heads); peak_mib is the resident memory the call adds (VmHWM after
  malloc_trim, this process: indicative);
- Qwen2-VL-2B's decoder dimensions (2 of its 28 layers, a 16k vocabulary, tied embeddings: about
  0.85 GB of float32 weights per implementation, to fit the machine's memory): prefill of one 448 x 448 image (256 image tokens) + 20 text tokens at batch 1,
  decode at batch 1 and 8 (ms per step = (generate of N - generate of 1) / (N - 1), tokens/s in
  extra), and the peak memory of a fresh process that loads the checkpoint and generates 16
  tokens after the prefill's prompt (memory_case.py; CPU only).
quick: tiny widths, small images (checks that every case runs).
"""

import ctypes
import gc
import tempfile

import torch

from vlmfast.bench import rss
from vlmfast.bench.decode_case import decode_case
from vlmfast.bench.memory_case import memory_case
from vlmfast.bench.timing import Result, interleaved_ms

IMAGES = [(1, 16, 16), (1, 22, 14), (1, 32, 24), (1, 10, 30)]
QUICK_IMAGES = [(1, 4, 4), (1, 6, 4), (1, 8, 6), (1, 2, 6)]
LARGE, QUICK_LARGE = (1, 56, 56), (1, 16, 16)
PATCH_DIM = 3 * 2 * 14 * 14
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 15990, 15991, 15988, 15989

TEXT = dict(vocab_size=16000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
            num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
QUICK_TEXT = dict(TEXT, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1000000.0})
QWEN2_VISION = dict(depth=4, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
QUICK_QWEN2_VISION = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2)
QWEN25_VISION = dict(depth=4, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
                     window_size=112, fullatt_block_indexes=[3])
QUICK_QWEN25_VISION = dict(depth=2, hidden_size=64, out_hidden_size=64, intermediate_size=96, num_heads=2,
                           window_size=56, fullatt_block_indexes=[1])
IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
           vision_end_token_id=VISION_END)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def build_pair(quick: bool, device, dtype):
    """(transformers Qwen2VLForConditionalGeneration (sdpa), vlmfast Qwen2VL, checkpoint folder
    holder) with the same random weights."""
    from vlmfast.models.qwen2vl import Qwen2VL

    transformers = _quiet_transformers()
    # tied embeddings, as Qwen2-VL-2B's (and one (V, D) matrix less to hold twice)
    config = transformers.Qwen2VLConfig(text_config=QUICK_TEXT if quick else TEXT,
                                        vision_config=QUICK_QWEN2_VISION if quick else QWEN2_VISION,
                                        tie_word_embeddings=True, **IDS)
    torch.manual_seed(0)
    hf = transformers.Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    hf = hf.to(dtype).eval()
    folder = tempfile.TemporaryDirectory()
    hf.save_pretrained(folder.name)
    return hf.to(device), Qwen2VL.from_pretrained(folder.name, device=device, dtype=dtype), folder


def build_qwen25_tower(quick: bool, device, dtype):
    """(transformers' Qwen2.5-VL vision tower (sdpa), vlmfast's VisionTower) with the same weights."""
    from vlmfast.models.qwen2vl.config import Qwen2VLVisionConfig
    from vlmfast.models.qwen2vl.vision import VisionTower
    from vlmfast.models.smolvlm.model import fuse_gate_up

    transformers = _quiet_transformers()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    spec = QUICK_QWEN25_VISION if quick else QWEN25_VISION
    config = transformers.Qwen2_5_VLConfig(vision_config=spec, text_config=QUICK_TEXT).vision_config
    torch.manual_seed(1)
    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa").to(dtype).eval()
    ours = VisionTower(Qwen2VLVisionConfig.from_hf(config.to_dict(), "qwen2_5_vl"), device=device, dtype=dtype)
    ours.load_state_dict(fuse_gate_up(hf.state_dict()))
    return hf.to(device), ours.eval()


def tower_flops(tower, grids) -> float:
    """GEMM + attention FLOPs of one call of a vlmfast VisionTower over the patches of `grids`."""
    cfg = tower.config
    layout = tower.layout(grids)
    T = sum(t * h * w for t, h, w in grids)
    D, I = cfg.width, cfg.mlp_hidden

    def pairs(bounds) -> int:  # sum of squared segment lengths: the (query, key) pairs attended
        bounds = bounds.tolist()
        return sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))

    full = pairs(layout.cu_seqlens)
    windowed = full if layout.cu_window_seqlens is None else pairs(layout.cu_window_seqlens)
    attention = sum(4 * D * (full if layout.window_index is None or i in cfg.fullatt_block_indexes else windowed)
                    for i in range(cfg.depth))
    mlp = 2 * T * D * I * (2 if cfg.version == "qwen2_vl" else 3)
    merged = D * cfg.merge_unit
    merger = 2 * (T // cfg.merge_unit) * merged * (merged + cfg.out_size)
    return 2 * T * PATCH_DIM * D + cfg.depth * (2 * T * D * 4 * D + mlp) + attention + merger


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - other libcs lack it
        return libc
    except (OSError, AttributeError):
        return None


def _release_memory() -> None:
    """Collects garbage and hands freed heap memory back to the system (glibc's malloc_trim)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def added_peak_mib(fn) -> float | None:
    """Resident memory fn() adds at its peak (VmHWM above VmRSS before it, freed memory handed
    back to the system first), or None where /proc cannot tell."""
    _release_memory()
    try:
        before = rss.status_mib("VmRSS")
        rss.reset_peak()
        fn()
        return rss.status_mib("VmHWM") - before
    except (OSError, KeyError):
        return None


def tower_case(name: str, hf_tower, ours_tower, grids, device, dtype, repeats: dict, memory: bool) -> Result:
    g = torch.Generator().manual_seed(2)
    T = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(T, PATCH_DIM, generator=g).to(device=device, dtype=dtype)
    grid = torch.tensor(grids, device=device)

    def ours():
        with torch.inference_mode():
            return ours_tower(pixels, grids)

    def theirs():
        with torch.inference_mode():
            return hf_tower(pixels, grid_thw=grid).pooler_output

    error = (ours().float() - theirs().float()).abs().max().item()
    ms, peer_ms = interleaved_ms(ours, theirs, device, **repeats)
    flops = tower_flops(ours_tower, grids)
    extra = {"patches": T, "max_abs_diff": error}
    peak = None
    if memory and device.type == "cpu":
        peak = added_peak_mib(ours)
        extra["peer_peak_mib"] = added_peak_mib(theirs)
        extra["score_matrix_mib_per_head"] = max(h * w for _, h, w in grids) ** 2 * 4 / 2**20
    return Result("qwen2vl", name, "vlmfast", ms, "transformers", peer_ms, tflops=flops / ms / 1e9, peak_mib=peak,
                  extra=extra)


def prompt(config, batch: int, text: int, grid=None, seed: int = 0, device=None):
    """Left-padded prompts: row b has b % 4 fewer tokens; with grid, the image tokens of one
    image after the first 5 text tokens (<vision_start> ... <vision_end>)."""
    g = torch.Generator().manual_seed(seed)
    image = grid[0] * grid[1] * grid[2] // 4 if grid else 0
    L = text + (image + 2 if grid else 0)
    ids = torch.randint(3, 15000, (batch, L), generator=g)
    if grid:
        ids[:, 5] = VISION_START
        ids[:, 6:6 + image] = IMAGE_TOKEN
        ids[:, 6 + image] = VISION_END
    mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(batch):
        mask[b, : b % 4] = 0
    ids[mask == 0] = 0
    types = (ids == IMAGE_TOKEN).long()
    return ids.to(device), mask.to(device), types.to(device)


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    name = str(dtype).removeprefix("torch.")
    repeats = dict(warmup=0, repeats=1) if quick else dict(warmup=1, repeats=3)
    images = QUICK_IMAGES if quick else IMAGES
    sizes = " ".join(f"{h * 14}x{w * 14}" for _, h, w in images)
    results = []

    hf25, ours25 = build_qwen25_tower(quick, device, dtype)
    results.append(tower_case(f"qwen2.5 vision tower 4 images ({sizes}) {name}", hf25, ours25, images, device,
                              dtype, repeats, memory=False))
    del hf25, ours25
    _release_memory()  # the towers' pages back to the system before the next pair is built

    hf, ours, folder = build_pair(quick, device, dtype)
    with folder:
        results.append(tower_case(f"qwen2 vision tower 4 images ({sizes}) {name}", hf.model.visual,
                                  ours.model.visual, images, device, dtype, repeats, memory=False))
        large = QUICK_LARGE if quick else LARGE
        results.append(tower_case(f"qwen2 vision tower 1 image {large[1] * 14}x{large[2] * 14} {name}",
                                  hf.model.visual, ours.model.visual, [large], device, dtype, repeats, memory=True))
        results += generation_cases(hf, ours, quick, device, dtype, repeats, name)
        if device.type == "cpu":
            inputs = _memory_inputs(ours.config, quick, dtype)
            del hf, ours  # the fresh processes below load their own copies: this one's are freed first
            _release_memory()
            results.append(memory_case("qwen2vl", folder.name, inputs, dtype, new_tokens=4 if quick else 16))
    return results


def _memory_inputs(config, quick: bool, dtype):
    """The prefill case's prompt (one image) as the memory case's generate inputs."""
    grid = (1, 8, 8) if quick else (1, 32, 32)
    ids, mask, types = prompt(config, 1, 20, grid)
    pixels = torch.randn(grid[1] * grid[2], PATCH_DIM, generator=torch.Generator().manual_seed(3)).to(dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": torch.tensor([grid]),
            "mm_token_type_ids": types}


def generation_cases(hf, ours, quick, device, dtype, repeats, name) -> list[Result]:
    results = []
    n_new = 4 if quick else 17
    grid = (1, 8, 8) if quick else (1, 32, 32)
    ids, mask, types = prompt(ours.config, 1, 20, grid, device=device)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(grid[1] * grid[2], PATCH_DIM, generator=g).to(device=device, dtype=dtype)
    grid_thw = torch.tensor([grid], device=device)
    vision = ours.vision_inputs(ids, mask, pixel_values=pixels, image_grid_thw=grid_thw)
    cache = ours.new_cache(1, ids.shape[1] + n_new)

    def ours_prefill():
        with torch.inference_mode():
            cache.reset()
            ours.prefill(ids, vision, None, mask.bool(), cache)

    def hf_prefill():
        with torch.inference_mode():
            hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid_thw,
               mm_token_type_ids=types, use_cache=True, logits_to_keep=1)

    ms, peer_ms = interleaved_ms(ours_prefill, hf_prefill, device, **repeats)
    image_tokens = grid[1] * grid[2] // 4
    results.append(Result("qwen2vl", f"prefill b=1 1 image {grid[1] * 14}x{grid[2] * 14} ({image_tokens} tokens) "
                          f"+ {ids.shape[1] - image_tokens} text {name}", "vlmfast", ms, "transformers", peer_ms))

    for batch in (1, 3) if quick else (1, 8):
        ids, mask, _ = prompt(ours.config, batch, 32, seed=batch, device=device)
        results.append(decode_case("qwen2vl", ours, hf, ids, mask, pad_token_id=0, n_new=n_new, device=device,
                                   dtype=dtype, repeats=repeats))
    return results


__all__ = ["run", "build_pair", "tower_flops"]
