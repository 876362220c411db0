"""BLIP-2's native CPU decode step (the OPT kind of csrc/cpu/decode.cpp, models/blip2/native_decode.py):
decode-step logits and the keys / values written against the float64 reference (the same model in
float64 on the eager path) under tests/tolerance.py's rule, padded rows, float32 and bfloat16;
greedy tokens equal to the eager path's and transformers'; the eager path for post-norm OPT and
for a hooked layer."""

import pytest
import torch

from tests.models.blip2.checkpoint import write_checkpoint
from tests.models.blip2.test_blip2 import LENGTHS, batch
from tests.tolerance import assert_close
from vlmfast.models.blip2 import Blip2, native_decode
from vlmfast.native import decode as native

pytestmark = pytest.mark.skipif(native.module() is None, reason="vlmfast._C without the decode kernels")


def needs(dtype):
    if dtype == torch.bfloat16 and not native.has_avx512_bf16():
        pytest.skip("no AVX512-BF16 on this CPU: bfloat16 decodes on the eager path")
    if dtype == torch.float32 and not native.module().cpu_features().get("avx512f"):
        pytest.skip("no AVX-512 on this CPU: float32 decodes on the eager path")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("blip2-native"), layout="pre-norm-tied", seed=3)


def run_steps(model, ids, mask, pixels, tokens, *, native_expected):
    """Prefill, then decode steps feeding tokens[:, i]: (logits (steps, B, V), the first layer's
    keys and the last layer's values)."""
    B, L = ids.shape
    with torch.inference_mode():
        cache = model.new_cache(B, L + tokens.shape[1] + 1)
        assert native_decode.will_run(model, tokens[:, 0], cache) is native_expected
        _, positions = model.prefill(ids, pixels.to(model.dtype), None, mask.bool(), cache)
        out = []
        for i in range(tokens.shape[1]):
            positions += 1
            out.append(model.decode_step(tokens[:, i], positions, cache))
        end = cache.length
        return torch.stack(out), cache.keys[0][:, :, :end].clone(), cache.values[-1][:, :, :end].clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_float64(path, dtype, monkeypatch):
    needs(dtype)
    calls = []
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a: calls.append(1) or real(*a))
    model = Blip2.from_pretrained(path, dtype=dtype)
    ids, mask, pixels = batch(model, LENGTHS, seed=4)
    tokens = torch.randint(5, model.config.text_config.vocab_size, (len(LENGTHS), 4),
                           generator=torch.Generator().manual_seed(5))
    fast = run_steps(model, ids, mask, pixels, tokens, native_expected=True)
    assert len(calls) == tokens.shape[1]  # every step ran natively
    model.native_decode = False
    low = run_steps(model, ids, mask, pixels, tokens, native_expected=True)  # could run, switched off
    reference = Blip2.from_pretrained(path, dtype=torch.float64)
    reference.native_decode = False
    expected = run_steps(reference, ids, mask, pixels, tokens, native_expected=False)
    assert len(calls) == tokens.shape[1]  # and nothing else did
    for name, actual, ref64, ref_low in zip(("logits", "keys", "values"), fast, expected, low):
        if name == "logits" and dtype != torch.float32:
            actual, ref_low = actual.to(dtype), ref_low.to(dtype)
        assert_close(actual, ref64, ref_low, name=name)


def test_greedy_generate_runs_natively_and_equals_transformers(path, monkeypatch):
    needs(torch.float32)
    from transformers import Blip2ForConditionalGeneration

    model = Blip2.from_pretrained(path)
    ids, mask, pixels = batch(model, LENGTHS, seed=6)
    steps = []
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a: steps.append(a[0][0]) or real(*a))
    actual = model.generate(ids, pixels, mask, max_new_tokens=7, eos_token_id=-1)
    assert steps == [len(LENGTHS)] * 6  # every decode step, all rows, in one native call
    model.native_decode = False
    assert torch.equal(model.generate(ids, pixels, mask, max_new_tokens=7, eos_token_id=-1), actual)
    hf = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=7,
                               do_sample=False, eos_token_id=None)
    assert torch.equal(actual, expected)


def test_eager_for_post_norm_and_hooked_layers(tmp_path):
    needs(torch.float32)
    post = Blip2.from_pretrained(write_checkpoint(tmp_path / "post", layout="post-norm-untied", seed=3))
    pre = Blip2.from_pretrained(write_checkpoint(tmp_path / "pre", layout="pre-norm-tied", seed=3))
    tokens = torch.ones(2, dtype=torch.long)
    with torch.inference_mode():
        assert not native_decode.will_run(post, tokens, post.new_cache(2, 8))  # OPT-350m's layout
        cache = pre.new_cache(2, 8)
        assert native_decode.will_run(pre, tokens, cache)
        handle = pre.decoder.layers[1].fc2.register_forward_hook(lambda *a: None)
        assert not native_decode.will_run(pre, tokens, cache)  # the hook must see the eager call
        handle.remove()
        assert native_decode.will_run(pre, tokens, cache)


def test_a_position_past_the_learned_table_is_refused(path):
    needs(torch.float32)
    model = Blip2.from_pretrained(path)
    rows = model.config.text_config.max_position_embeddings  # the table's rows past OPT's offset
    tokens = torch.ones(1, dtype=torch.long)
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model.decode_step(tokens, torch.tensor([rows - 1]), cache)  # the last row: fine
        with pytest.raises(ValueError, match=rf"positions\[0\] = {rows} is outside the position tables' {rows} rows"):
            model.decode_step(tokens, torch.tensor([rows]), cache)
