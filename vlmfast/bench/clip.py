"""CLIP: image-embedding throughput and a training step of vlmfast's CLIP against transformers'
CLIPModel (sdpa attention), the same random weights (built offline from config dicts with the
real dimensions; quick: a tiny model of the same structure).

Cases (TARGETS.md):
- image embedding (get_image_features / encode_image, inference mode): on the CPU ViT-B/32 at
  batch 32 (float32); on CUDA ViT-B/32 batch 1024, B/16 batch 512, L/14 batch 256 (the run's
  dtype, bf16 by default). extra: img/s of both and the largest difference of the embeddings.
- training step of ViT-B/32, both towers, full 77-token texts, AdamW on float32 weights (bf16
  autocast when the run's dtype is not float32), batch 256 on CUDA / 32 on the CPU. vlmfast:
  its model + the fused ClipLoss (vlmfast.train.contrastive_loss); transformers: its model + a
  materialised ClipLoss (normalise, B x B logits, cross-entropy both ways). extra: pairs/s;
  peak_mib (CUDA only): the peak allocated during a step with only that model on the device
  (weights, gradients, AdamW state, activations).
"""

import gc

import torch
import torch.nn.functional as F

from vlmfast.bench.timing import Result, interleaved_ms, time_ms
from vlmfast.models import CLIP, CLIPConfig
from vlmfast.models.checkpoint import load_state
from vlmfast.train import contrastive_loss

_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
               vocab_size=49408, max_position_embeddings=77)
_TEXT_L = dict(_TEXT_B, hidden_size=768, intermediate_size=3072, num_attention_heads=12)
_VISION_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224)
# OpenAI CLIP's dimensions (transformers CLIPConfig keyword arguments)
MODELS = {
    "ViT-B/32": dict(text_config=_TEXT_B, vision_config=dict(_VISION_B, patch_size=32), projection_dim=512),
    "ViT-B/16": dict(text_config=_TEXT_B, vision_config=dict(_VISION_B, patch_size=16), projection_dim=512),
    "ViT-L/14": dict(text_config=_TEXT_L, projection_dim=768,
                     vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, image_size=224, patch_size=14)),
}
QUICK = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=100, max_position_embeddings=16),
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8),
             projection_dim=16)

EMBED_CASES = {"cpu": [("ViT-B/32", 32)], "cuda": [("ViT-B/32", 1024), ("ViT-B/16", 512), ("ViT-L/14", 256)]}
TRAIN_BATCH = {"cpu": 32, "cuda": 256}


def build_pair(spec: dict, dtype: torch.dtype = torch.float32):
    """(transformers CLIPModel with sdpa attention, vlmfast CLIP) with the same random weights, on
    the CPU in dtype, neither sharing storage with the other."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**spec, attn_implementation="sdpa")).to(dtype).eval()
    with torch.device("meta"):
        ours = CLIP(CLIPConfig.from_hf(hf.config.to_dict()))
    load_state(ours, {k: v.clone() for k, v in hf.state_dict().items()}, dtype=dtype)
    return hf, ours.eval()


def _inputs(spec: dict, batch: int, device, dtype, seed: int = 0):
    """Random pixels (B, 3, S, S) in dtype and full-length token ids (B, L) ending in the eos."""
    g = torch.Generator().manual_seed(seed)
    size = spec["vision_config"]["image_size"]
    text = spec["text_config"]
    vocab, length = text["vocab_size"], text["max_position_embeddings"]
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device, dtype)
    ids = torch.randint(1, vocab - 1, (batch, length), generator=g)
    ids[:, -1] = vocab - 1  # the highest id: the pooled token under either eos rule
    return pixels, ids.to(device)


def _repeats(device, quick: bool) -> dict:
    if quick:
        return dict(warmup=1, repeats=1)
    return dict(warmup=1, repeats=3) if device.type == "cpu" else {}


def _embed_case(name: str, spec: dict, batch: int, device, dtype, quick: bool) -> Result:
    hf, ours = build_pair(spec, dtype)
    hf, ours = hf.to(device), ours.to(device)
    pixels, _ = _inputs(spec, batch, device, dtype)

    def ours_embed():
        with torch.inference_mode():
            return ours.encode_image(pixels)

    def hf_embed():
        with torch.inference_mode():
            return hf.get_image_features(pixel_values=pixels).pooler_output

    diff = (ours_embed().float() - hf_embed().float()).abs().max().item()
    ms, peer_ms = interleaved_ms(ours_embed, hf_embed, device, **_repeats(device, quick))
    del hf, ours
    _release(device)
    return Result("clip", f"image embedding {name} b={batch} {_dtype_name(dtype)}", "vlmfast", ms,
                  "transformers", peer_ms,
                  extra={"img_per_s": batch * 1e3 / ms, "peer_img_per_s": batch * 1e3 / peer_ms,
                         "max_abs_diff": diff})


def materialised_clip_loss(image_embeds, text_embeds, logit_scale):
    """open_clip's ClipLoss: normalise, the B x B logits both ways, mean cross-entropy."""
    img, txt = F.normalize(image_embeds.float(), dim=-1), F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _hf_loss(hf, pixels, ids):
    img = hf.get_image_features(pixel_values=pixels).pooler_output
    txt = hf.get_text_features(input_ids=ids).pooler_output
    return materialised_clip_loss(img, txt, hf.logit_scale)


def _ours_loss(ours, pixels, ids):
    return contrastive_loss(ours, pixels, ids)


def _train_timing(model, loss_fn, pixels, ids, device, dtype, quick: bool):
    """(ms per step, peak MiB or None) of AdamW steps of `model`, moved to `device` for the
    measurement and back to the CPU after."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    autocast = dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = loss_fn(model, pixels, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    ms = time_ms(step, device, **_repeats(device, quick))
    del optimizer
    model.to("cpu")
    _release(device)
    return ms, peak


def _train_case(spec: dict, name: str, batch: int, device, dtype, quick: bool) -> Result:
    hf, ours = build_pair(spec, torch.float32)  # float32 master weights; autocast for bf16
    pixels, ids = _inputs(spec, batch, device, torch.float32)
    ms, peak = _train_timing(ours, _ours_loss, pixels, ids, device, dtype, quick)
    peer_ms, peer_peak = _train_timing(hf, _hf_loss, pixels, ids, device, dtype, quick)
    return Result("clip", f"train step {name} b={batch} {_dtype_name(dtype)}", "vlmfast", ms, "transformers",
                  peer_ms, peak_mib=peak,
                  extra={"pairs_per_s": batch * 1e3 / ms, "peer_pairs_per_s": batch * 1e3 / peer_ms,
                         "peer_peak_mib": peer_peak})


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    results = []
    if quick:
        results.append(_embed_case("tiny", QUICK, 4, device, dtype, quick))
        results.append(_train_case(QUICK, "tiny", 4, device, dtype, quick))
        return results
    for name, batch in EMBED_CASES[kind]:
        results.append(_embed_case(name, MODELS[name], batch, device, dtype, quick))
    results.append(_train_case(MODELS["ViT-B/32"], "ViT-B/32", TRAIN_BATCH[kind], device, dtype, quick))
    return results
