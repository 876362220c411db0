"""The rest of a prompt after a cached prefix (prefix_cache.py), for the families the generic
runner drives: slots [0, start) of the staging cache already hold the prefix; tokens [start, L)
run through the decoder at slot `start`, each attending to every earlier slot and to itself, at
the rotary positions the whole prompt's prefill gives them (Qwen2-VL: M-RoPE over the whole
prompt, so the image grids move the positions after them as in model.prefill). The embeddings
of the rest are the text table's alone when it holds no image token (the images' features are
then not needed at all), else the whole prompt's, sliced.

prefill_rest(model, input_ids, first, second, start, cache) takes what model.prefill takes
(first, second: the family's vision arguments as GenericRunner builds them) and returns what it
returns; None when the family has no such path here (the caller then prefills from scratch).
"""

from __future__ import annotations

import torch


def supports(model) -> bool:
    return _family(model) is not None


def _family(model) -> str | None:
    from vlmfast.models.causal_vlm import CausalVLM
    from vlmfast.models.qwen2vl.model import Qwen2VL

    if isinstance(model, Qwen2VL):
        return "qwen2vl"
    if isinstance(model, CausalVLM):
        return "causal"
    return None


def rest_mask(start: int, length: int, device) -> torch.Tensor:
    """bool (1, 1, length - start, length): query i (slot start + i) sees slots [0, start + i]."""
    queries = torch.arange(start, length, device=device)
    keys = torch.arange(length, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


def prefill_rest(model, input_ids, first, second, start: int, cache, image_ids: set[int]):
    family = _family(model)
    if family is None:
        return None
    L = input_ids.shape[1]
    if not 0 < start < L or cache.length != start:
        raise ValueError(f"start: expected 0 < start < {L} slots already in the cache, got {start} "
                         f"(cache length {cache.length})")
    rest = input_ids[:, start:]
    text_only = not any(t in image_ids for t in rest[0].tolist())
    mask = rest_mask(start, L, input_ids.device)
    cache.key_mask[:, start:L] = True
    if family == "qwen2vl":
        return _qwen2vl(model, input_ids, first, start, cache, text_only, mask)
    return _causal(model, input_ids, first, start, cache, text_only, mask)


def _qwen2vl(model, input_ids, vision, start, cache, text_only, mask):
    from vlmfast.models.qwen2vl import inputs as _inputs
    from vlmfast.models.qwen2vl.model import MRopeKVCache

    vision = vision if isinstance(vision, _inputs.VisionInputs) else _inputs.VisionInputs()
    L = input_ids.shape[1]
    if text_only:
        embeds = model.embed(input_ids[:, start:], _inputs.VisionInputs())
    else:
        embeds = model.embed(input_ids, vision)[:, start:]
    full = torch.ones_like(input_ids, dtype=torch.bool)
    positions = model.mrope_positions(input_ids, vision, full)  # (3, 1, L): as model.prefill numbers them
    uniform = bool((positions[0] == positions[1]).all() and (positions[0] == positions[2]).all())
    rest = positions[..., start:]
    hidden = model.model.language_model(embeds, rest[0] if uniform else rest, attn_mask=mask, is_causal=False,
                                        cache=cache, slot=start)
    cache.advance(L - start)
    last = positions[:, :, -1]
    if isinstance(cache, MRopeKVCache):
        cache.offsets.copy_(last - last[0])
        cache.uniform = bool((cache.offsets == 0).all())
    return model.head(hidden[:, -1]).float(), last[0].clone()


def _causal(model, input_ids, pixel_values, start, cache, text_only, mask):
    from vlmfast.ops.linear import packed_weight_cache

    L = input_ids.shape[1]
    with packed_weight_cache(model.cache_packed_weights):
        if text_only:
            embeds = model.embed(input_ids[:, start:])
        else:
            embeds = model.embed(input_ids, pixel_values)[:, start:]
        positions = torch.arange(start, L, device=input_ids.device)[None]  # generate()'s, no padding
        hidden = model.decoder(embeds, positions, mask, False, cache=cache, slot=start)
        cache.advance(L - start)
        return model.head(hidden[:, -1]).float(), positions[:, -1].clone()
