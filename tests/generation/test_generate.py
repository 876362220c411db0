"""Batched generation on a tiny random SmolVLM (no transformers needed): the static cache is
written in place and agrees with a full forward, a left-padded batch equals each row alone,
streaming sees every token, stop tokens stop rows, a reused cache gives the same output."""

import os

import pytest
import torch

from tests.models.smolvlm_helpers import PAD, build_batch, tiny_model
from vlmfast.generation import StaticKVCache

ROWS = [(5, 3, 4, None), (1, 7, 2, None), (0, 6, 0, None)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_cache_is_written_in_place_and_matches_a_full_forward(model):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=2)
    B, L = ids.shape
    cache = model.new_cache(B, L + 6)
    pointers = [t.data_ptr() for t in cache.keys + cache.values + [cache.key_mask]]
    out = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=6, eos_token_id=[], cache=cache)
    assert [t.data_ptr() for t in cache.keys + cache.values + [cache.key_mask]] == pointers
    assert cache.length == L + 5  # the last token is emitted, never run
    # the cached steps' logits against recomputing the whole sequence (generate's positions)
    full_mask = torch.cat([mask, torch.ones(B, 6, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(out, pixels, pixel_mask, full_mask, position_ids=positions)
        cache2 = model.new_cache(B, L + 6)
        logits, pos = model.prefill(ids, pixels, pixel_mask, mask.bool(), cache2)
        steps = [logits]
        for t in range(5):
            pos = pos + 1
            steps.append(model.decode_step(out[:, L + t], pos, cache2))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, L - 1:-1].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, L:], full[:, L - 1:-1].argmax(-1))


def test_static_shape_decode_equals_the_sliced_one(model):
    """The graph-capturable step (index_copy_ into the cache, attention over all slots under
    the key mask) gives the same logits and tokens as the step that slices the cache."""
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=7)
    B, L = ids.shape
    dynamic = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=6, eos_token_id=[])
    static = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=6, eos_token_id=[], static_shapes=True)
    assert torch.equal(static, dynamic)
    with torch.no_grad():
        caches = [model.new_cache(B, L + 12) for _ in range(2)]
        (l0, p0), (l1, p1) = (model.prefill(ids, pixels, pixel_mask, mask.bool(), c) for c in caches)
        slot = torch.tensor([L])
        a = model.decode_step(dynamic[:, L], p0 + 1, caches[0])
        b = model.decode_step_static(dynamic[:, L], p1 + 1, slot, caches[1])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("VLMFAST_SLOW") != "1", reason="compiles for ~40 s; VLMFAST_SLOW=1")
def test_static_decode_step_compiles_fullgraph(model):
    """The CUDA-graph hook's function traces as one graph (no breaks) and gives the same logits."""
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=8)
    B, L = ids.shape
    slot = torch.tensor([L])
    step = torch.compile(model.decode_step_static, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        outs = []
        for fn in (step, model.decode_step_static):
            cache = model.new_cache(B, L + 4)
            logits, pos = model.prefill(ids, pixels, pixel_mask, mask.bool(), cache)
            outs.append(fn(logits.argmax(-1), pos + 1, slot, cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone(model):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=3)
    batched = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=7, eos_token_id=[])
    for b in range(len(ROWS)):
        keep = mask[b].bool()
        n = ROWS[b][0]
        alone = model.generate(ids[b:b + 1, keep], pixels[b:b + 1, :n] if n else None,
                               pixel_mask[b:b + 1, :n] if n else None, max_new_tokens=7, eos_token_id=[])
        assert torch.equal(alone[0, keep.sum():], batched[b, ids.shape[1]:]), b


def test_streaming_stop_tokens_and_cache_reuse(model):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=4)
    L = ids.shape[1]
    free = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=[])
    stops = [int(free[0, L + 1]), int(free[2, L + 4])]  # rows 0 and 2 stop; row 1 may too
    seen = []
    cache = model.new_cache(3, L + 8)
    out = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=stops, pad_token_id=PAD,
                         streamer=seen.append, cache=cache)
    assert torch.equal(torch.stack(seen, 1), out[:, L:])
    cuts = []
    for b in range(3):  # each row: the free run up to and including its first stop token, then PAD
        row = free[b, L:].tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        cuts.append(cut)
        assert out[b, L:L + cut].tolist() == row[:cut][: out.shape[1] - L]
        assert (out[b, L + cut:] == PAD).all()
    assert cuts[0] == 2 and cuts[2] <= 5
    assert out.shape[1] == L + max(cuts)  # generation ends once every row has stopped
    again = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=stops, pad_token_id=PAD,
                           cache=cache)
    assert torch.equal(again, out)

    class Streamer:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, tokens):
            self.tokens.append(tokens.clone())

        def end(self):
            self.ended = True

    s = Streamer()
    model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=3, eos_token_id=[], streamer=s)
    assert s.ended and len(s.tokens) == 3


def test_sampling_generation(model):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=5)
    greedy = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[])
    nucleus1 = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[], do_sample=True,
                              top_p=1e-6)
    assert torch.equal(greedy, nucleus1)
    a, b = (model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[], do_sample=True,
                           temperature=1.5, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


def test_bfloat16_generation_runs():
    model = tiny_model(seed=1, dtype=torch.bfloat16)
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=6)
    out = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (3, ids.shape[1] + 4) and out.dtype == torch.long
    assert model.new_cache(3, 10).dtype == torch.bfloat16
    from vlmfast.models.smolvlm import fast_decode, packing

    with torch.inference_mode():
        native = fast_decode.will_run(model, ids[:, -1], model.new_cache(3, ids.shape[1] + 4))
    if native:  # the native CPU step reads the plain weights: no packed copy, the eager path's tokens
        assert packing._ATTR not in model.model.text_model.layers[0].mlp.gate_up.__dict__
        model.fast_decode = model.auto_pack = False
        assert torch.equal(model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=4, eos_token_id=[]), out)
    elif packing.available(torch.bfloat16):  # generate packed the CPU bf16 weights, same tokens
        assert packing._ATTR in model.model.text_model.layers[0].mlp.gate_up.__dict__
        model.unpack_weights()
        model.auto_pack = False
        assert torch.equal(model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=4, eos_token_id=[]), out)


def test_bad_generation_options(model):
    ids, mask, _, _ = build_batch([(0, 5, 0, None)])
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive int, got 0"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature: expected a positive float"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="max_len: expected a positive int"):
        StaticKVCache(2, 1, 2, 0, 16)


def test_padding_inferred_as_transformers_does():
    from vlmfast.generation.generate import infer_padding

    ids = torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]])
    stops = torch.tensor([2])
    assert infer_padding(ids, None, stops).all()  # no pad id: nothing is padding
    assert infer_padding(ids, 2, torch.tensor([2])).all()  # pad id is a stop token
    assert infer_padding(ids, 9, stops).all()  # pad id absent from the prompt
    assert torch.equal(infer_padding(ids, 0, stops), ids != 0)
