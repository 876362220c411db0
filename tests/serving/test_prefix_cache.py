"""Prefix caching: prompts that start like an earlier one (the same image asked again, a longer
second turn, an exact repeat) copy the cached keys / values and prefill only the rest, and still
answer token for token as model.generate alone (float32) - for SmolVLM (chunked prefill, tiles
skipped) and Qwen2-VL (M-RoPE positions moved by the image grid); a different image under the
same token ids shares nothing past its first image token; eviction by bytes."""

import pytest
import torch

from tests.models.smolvlm_helpers import IMAGE_TOKEN, build_batch, tiny_model
from vlmfast.generation.cache import StaticKVCache
from vlmfast.serving import Engine, Request, SamplingParams
from vlmfast.serving.prefix_cache import PrefixCache, prompt_keys

STOPS = [7, 42]


def _params(i):
    if i % 3 == 2:
        return SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=i)
    return SamplingParams(max_tokens=9, temperature=0)


def _alone(model, request, **vision_names):
    p = request.params
    options = {}
    if not p.greedy:
        options = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p,
                       generator=torch.Generator().manual_seed(p.seed))
    out = model.generate(request.input_ids[None], **request.vision, max_new_tokens=p.max_tokens,
                         eos_token_id=STOPS, **options)
    return out[0, request.prompt_len:].tolist()


def _family_of_prompts(ids, vision, other_vision, image_token, vocab, seed, join):
    """[(request, the least / most tokens it may reuse)] in submission order. join(a, b): the
    vision inputs of a prompt with a's images, then b's."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, vocab, (n,), generator=g)  # noqa: E731
    last_image = int((ids == image_token).nonzero().max())
    first_image = int((ids == image_token).nonzero().min())
    head = ids[:last_image + 1]
    shared_text = first_image if first_image >= 16 else 0  # the text before the image (when long enough)
    prompts = [
        (ids, vision, (0, 0)),                                               # first: nothing cached
        (torch.cat([head, text(5)]), vision, (last_image + 1, last_image + 1)),  # another question, same image
        (ids.clone(), vision, (ids.numel() - 1, ids.numel() - 1)),           # an exact repeat
        (torch.cat([ids, text(7)]), vision, (ids.numel(), ids.numel())),     # a longer second turn
        (ids.clone(), other_vision, (shared_text, shared_text)),             # same tokens, another image
        (torch.cat([head, text(2)]), vision, (last_image + 1, last_image + 1)),
        # a next turn that adds the other image: the whole first prompt is reused
        (torch.cat([ids, text(4), ids[first_image:last_image + 1], text(3)]), join(vision, other_vision),
         (ids.numel(), ids.numel())),
        # the two images the other way round: its first turn is the one asked with the other image
        (torch.cat([ids, text(4), ids[first_image:last_image + 1], text(3)]), join(other_vision, vision),
         (ids.numel(), ids.numel())),
    ]
    return [(Request(p, v, _params(i)), bounds) for i, (p, v, bounds) in enumerate(prompts)]


@pytest.mark.parametrize("chunk", [256, 5])
def test_smolvlm_prefix_reuse_equals_generate_alone(chunk):
    model, reference = tiny_model(seed=4), tiny_model(seed=4)
    # 18 text tokens before the image: another image under the same tokens reuses them, then
    # prefills its tiles' tokens from slot 18 on
    ids, _, pv, pm = build_batch([(5, 18, 8, None)], seed=3)
    _, _, pv2, pm2 = build_batch([(5, 18, 8, None)], seed=9)
    vision = {"pixel_values": pv, "pixel_attention_mask": pm}
    def join(a, b):
        return {k: torch.cat([a[k], b[k]], dim=1) for k in a}

    cases = _family_of_prompts(ids[0], vision, {"pixel_values": pv2, "pixel_attention_mask": pm2}, IMAGE_TOKEN,
                               IMAGE_TOKEN, seed=chunk, join=join)
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        engine = Engine(model, max_batch=2, max_len=160, chunk_tokens=chunk, eos_token_id=STOPS)
        results = engine.generate([r for r, _ in cases])
    finally:
        hook.remove()
    for (request, (low, high)), result in zip(cases, results):
        assert result["token_ids"] == _alone(reference, request)
        assert low <= result["cached_tokens"] <= high, (result["cached_tokens"], low, high)
    # tiles ran for the first image and the other image only (then the encoder cache answered)
    assert len(calls) == 2 * 5
    assert engine.prefix_cache.hits == 7


def test_qwen2vl_prefix_reuse_equals_generate_alone(tmp_path):
    pytest.importorskip("transformers")
    from tests.models.qwen2vl.helpers import build_batch as qwen_batch
    from tests.models.qwen2vl.helpers import write_checkpoint
    from transformers import AutoConfig
    from vlmfast.models.qwen2vl import Qwen2VL

    path = write_checkpoint(tmp_path / "qwen")
    model, reference = Qwen2VL.from_pretrained(path), Qwen2VL.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    # a 4 x 8 patch grid: 8 image tokens whose M-RoPE positions span only 4 steps, so every
    # later token's position is not its index (a wrong offset would show)
    ids, _, pixels, grid, _ = qwen_batch(config, [[(1, 4, 8)] * 2], seed=1)
    _, _, pixels2, _, _ = qwen_batch(config, [[(1, 4, 8)] * 2], seed=2)
    ids = torch.cat([ids[0, :1].repeat(16), ids[0]])  # a text head past min_tokens: another image reuses it
    vision = {"pixel_values": pixels, "image_grid_thw": grid}
    def join(a, b):
        return {k: torch.cat([a[k], b[k]]) for k in a}

    cases = _family_of_prompts(ids, vision, {"pixel_values": pixels2, "image_grid_thw": grid},
                               model.config.image_token_id, config.text_config.vocab_size - 8, seed=5, join=join)
    engine = Engine(model, max_batch=2, max_len=160, eos_token_id=STOPS)
    results = engine.generate([r for r, _ in cases])
    for (request, (low, high)), result in zip(cases, results):
        assert result["token_ids"] == _alone(reference, request)
        assert low <= result["cached_tokens"] <= high, (result["cached_tokens"], low, high)
    assert engine.prefix_cache.hits == 7


def _staging(values):
    cache = StaticKVCache(2, 1, 1, 64, 4)
    for i, t in enumerate(cache.keys + cache.values):
        t[0, 0, :, :] = values + i
    return cache


def test_prefix_cache_keys_evicts_by_bytes_and_copies_exactly():
    ids = torch.arange(100, 140)
    a = prompt_keys(ids, {}, {5})
    img = {"pixel_values": torch.ones(2, 3)}
    b = prompt_keys(torch.cat([ids[:20], torch.tensor([5]), ids[20:]]), img, {5})
    c = prompt_keys(torch.cat([ids[:20], torch.tensor([5]), ids[20:]]), {"pixel_values": torch.zeros(2, 3)}, {5})
    assert a[:20] == b[:20] == c[:20] and b[20] != c[20] and b[20:] != c[20:]
    per_entry = 40 * 4 * 4 * 4  # 40 slots x (2 layers x keys + values) x 4 floats x 4 bytes
    cache = PrefixCache(per_entry + per_entry // 2)
    source = _staging(torch.arange(64.0)[:, None])
    source.length = 40
    cache.store(a, source)
    target = StaticKVCache(2, 1, 1, 64, 4)
    longer = prompt_keys(torch.arange(100, 150), {}, {5})
    assert cache.restore(longer, target) == 40 and target.length == 40
    assert all(torch.equal(t[0, :, :40], s[0, :, :40]) for t, s in zip(target.keys + target.values,
                                                                      source.keys + source.values))
    assert target.key_mask[0, :40].all() and not target.key_mask[0, 40:].any()
    assert cache.restore(a, StaticKVCache(2, 1, 1, 64, 4)) == 39  # the last token always runs
    cache.store(c[:40], source)  # a second entry does not fit beside the first: the first goes
    assert len(cache) == 1 and cache.bytes == per_entry
    assert cache.match(longer)[1] == 20  # only the text before the image is shared with what is left
    assert cache.match(c[:40] + [b"x"])[1] == 40
    assert PrefixCache(0).match(a) == (None, 0)


def test_image_units_per_tile_and_their_fallbacks():
    from vlmfast.serving.prefix_cache import image_units

    model = tiny_model(seed=1)
    ids, _, pv, pm = build_batch([(2, 3, 2, None)], seed=2)
    ids = ids[0]
    units = image_units(model, ids, {"pixel_values": pv, "pixel_attention_mask": pm})
    per = len(units) // 2
    assert len(units) == int((ids == IMAGE_TOKEN).sum()) and units[0] == units[per - 1] != units[per]
    changed = pv.clone()
    changed[:, 1] += 1  # the second tile only: the first tile's tokens keep their digest
    other = image_units(model, ids, {"pixel_values": changed, "pixel_attention_mask": pm})
    assert other[:per] == units[:per] and other[per:] != units[per:]
    padded = pv.clone()
    padded[:, 1] = 0  # an all-zero tile is padding (no tokens): no per-tile keys
    assert image_units(model, ids, {"pixel_values": padded, "pixel_attention_mask": pm}) is None
    assert image_units(model, ids[:-3 - per], {"pixel_values": pv, "pixel_attention_mask": pm}) is None
    vision = {"pixel_values": pv, "pixel_attention_mask": pm}
    image_ids = {IMAGE_TOKEN}
    whole = prompt_keys(ids, vision, image_ids)
    assert prompt_keys(ids, vision, image_ids, units) != whole
    assert prompt_keys(ids, vision, image_ids, units[:-1]) == whole  # counts that disagree: the whole digest
