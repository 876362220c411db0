"""The native CPU decode step (csrc/cpu/decode.cpp via vlmfast/models/smolvlm/fast_decode.py).

Its matrix-vector kernel and whole decode steps against the float64 reference (the same model in
float64 on the eager path), under the tolerance rule of tests/tolerance.py (bfloat16: 2x the eager
bfloat16 path's error), with odd sizes (head dims 40/72/80, 113 intermediate, 197 vocabulary,
GQA and MHA, biases, tied head, left padding); the keys/values it writes; when it steps aside for
the eager path; bad input; and greedy generation equal to the eager path's.
"""

import pytest
import torch

from tests.models.smolvlm_helpers import SCALE, tiny_model
from tests.tolerance import assert_close
from vlmfast.models.smolvlm import SmolVLM, SmolVLMConfig, SmolVLMTextConfig, SmolVLMVisionConfig, fast_decode
from vlmfast.native import decode as native

pytestmark = pytest.mark.skipif(native.module() is None, reason="vlmfast._C without the decode kernels")

DTYPES = [torch.float32, torch.bfloat16]


def needs(dtype):
    if dtype == torch.bfloat16 and not native.has_avx512_bf16():
        pytest.skip("no AVX512-BF16 on this CPU: bfloat16 decodes on the eager path")
    if dtype == torch.float32 and not native.module().cpu_features().get("avx512f"):
        pytest.skip("no AVX-512 on this CPU: float32 decodes on the eager path")


# ------------------------------------------------------------------ the matrix-vector kernel

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K", [(1, 1, 40), (3, 113, 72), (1, 197, 80), (2, 7, 33), (5, 130, 576), (8, 45, 96),
                                   (9, 13, 1537), (17, 37, 80)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_matches_float64(dtype, B, N, K, with_bias, threads):
    g = torch.Generator().manual_seed(N * K + B)
    x = torch.randn(B, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    out = native.gemv(x, w, bias, threads=threads)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    low = torch.nn.functional.linear(x, w, bias)
    assert out.dtype == torch.float32
    assert_close(out.to(dtype), expected, low, name="gemv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_rows_do_not_depend_on_the_batch(dtype, threads):
    """Each row of x lands in a tile of 4, 3, 2 or 1 rows, whatever B: the same sum in every case,
    so a row's result is bit for bit its result alone (a batched decode step gives each row the
    logits it would get by itself)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(11, 203, generator=g).to(dtype)
    w = torch.randn(57, 203, generator=g).to(dtype)
    bias = torch.randn(57, generator=g).to(dtype)
    batched = native.gemv(x, w, bias, threads=threads)
    for b in range(x.shape[0]):
        assert torch.equal(native.gemv(x[b:b + 1].contiguous(), w, bias, threads=threads)[0], batched[b])


def test_gemv_bad_input():
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"x: expected \(B, K\)"):
        native.gemv(x[0], w)
    with pytest.raises(ValueError, match=r"weight: expected \(N, K\) with K = 8"):
        native.gemv(x, torch.randn(5, 9))
    with pytest.raises(ValueError, match=r"bias: expected \(N,\) = \(5,\)"):
        native.gemv(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="x: expected float32 or bfloat16"):
        native.gemv(x.bfloat16(), w)
    with pytest.raises(TypeError, match="weight: expected a float32"):
        native.gemv(x, w.long())
    with pytest.raises(ValueError, match="weight: expected a contiguous CPU tensor"):
        native.gemv(x, torch.randn(8, 5).t())


def test_step_bad_slot_token_position_or_tables():
    model = tiny_model()
    table = native.layer_table([dict(input_norm=p) for p in [model.head_weight] * 2])
    z = torch.zeros(3, 6)
    zero = torch.zeros(1, dtype=torch.long)
    weights = (model.head_weight, table, model.head_weight, None, model.head_weight)
    rest = (z, z, None, None, 1)  # rotary tables of 3 rows, no learned positions, no mask, 1 thread

    def step(shape, tokens, positions, kind=native.LLAMA, tables=rest):
        return native.step(shape, kind, (1e-5, 0.3, 1.0), tokens, positions, *weights, *tables)

    with pytest.raises(ValueError, match="slot outside the cache"):
        step((1, 48, 4, 2, 12, 80, 200, 2, 4, 4), zero, zero)  # slot 4 of a 4-slot cache
    shape = (1, 48, 4, 2, 12, 80, 200, 2, 4, 2)
    with pytest.raises(ValueError, match=r"positions\[0\] = 3 is outside the position tables' 3 rows"):
        step(shape, zero, zero + 3)
    rows = model.head_weight.shape[0]
    with pytest.raises(ValueError, match=rf"tokens\[0\] = {rows} is outside the embedding's {rows} rows"):
        step(shape, zero + rows, zero)
    with pytest.raises(ValueError, match="tokens\\[0\\] = -1"):
        step(shape, zero - 1, zero)
    with pytest.raises(ValueError, match="expected rotary tables for a Llama stack, learned positions for OPT"):
        step(shape, zero, zero, kind=native.OPT)


# ------------------------------------------------------------------ whole decode steps

def odd_model(head_dim, heads, kv_heads, *, bias=False, tied=False, dtype=torch.float32, seed=0) -> SmolVLM:
    torch.manual_seed(seed)
    cfg = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
        text_config=SmolVLMTextConfig(vocab_size=197, hidden_size=72, intermediate_size=113, num_hidden_layers=3,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                      rope_theta=1000.0, attention_bias=bias, mlp_bias=bias, pad_token_id=0,
                                      tie_word_embeddings=tied),
        scale_factor=SCALE, image_token_id=196,
    )
    model = SmolVLM(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def run_steps(model, ids, mask, tokens, *, steps=3, native_expected=None):
    """Prefill, then `steps` decode steps feeding tokens[:, i]. Returns (logits (steps, B, V),
    the first layer's keys and the last layer's values after the steps)."""
    B, L = ids.shape
    with torch.inference_mode():
        cache = model.new_cache(B, L + steps + 2)
        if native_expected is not None:
            assert fast_decode.will_run(model, tokens[:, 0], cache) is native_expected
        _, positions = model.prefill(ids, None, None, mask, cache)
        out = []
        for i in range(steps):
            positions += 1
            out.append(model.decode_step(tokens[:, i], positions, cache, padded=not bool(mask.all())))
        end = cache.length
        return torch.stack(out), cache.keys[0][:, :, :end].clone(), cache.values[-1][:, :, :end].clone()


def prompts(B, L, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, : b % 3] = False  # left padding
    tokens = torch.randint(1, vocab - 1, (B, 3), generator=g)
    return ids, mask, tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,kv_heads,bias,tied,B", [
    (40, 3, 1, False, False, 1), (72, 4, 2, True, False, 2), (80, 2, 2, False, True, 2),
    (40, 6, 2, False, False, 5), (72, 4, 2, True, True, 8), (80, 2, 1, False, False, 9),
])
def test_decode_steps_match_float64(dtype, head_dim, heads, kv_heads, bias, tied, B):
    needs(dtype)
    model = odd_model(head_dim, heads, kv_heads, bias=bias, tied=tied, dtype=dtype)
    ids, mask, tokens = prompts(B, 9, 197, seed=head_dim)
    logits, keys, values = run_steps(model, ids, mask, tokens, native_expected=True)
    model.fast_decode = False
    low = run_steps(model, ids, mask, tokens)
    model.double()
    expected = run_steps(model, ids, mask, tokens, native_expected=False)
    for name, actual, ref64, ref_low in zip(("logits", "keys", "values"), (logits, keys, values), expected, low):
        actual = actual if name != "logits" or dtype == torch.float32 else actual.to(dtype)
        ref_low = ref_low if name != "logits" or dtype == torch.float32 else ref_low.to(dtype)
        # float32 logits: 1e-5 of the largest logit, as the eager float32 path reaches
        assert_close(actual, ref64, ref_low, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_tasks_of_whole_groups_or_single_heads_agree(dtype):
    """The step attends a key/value head's query heads together (passes of up to 4) where there
    are tasks enough for every thread twice over (B Hkv >= 2 threads), else one head per task.
    Each head's sums are the same either way, so logits and cache are the same bits at 1, 2 and 5
    threads (3 rows, 5 query heads on one key/value head: passes of 4 + 1, then single heads),
    and match the float64 reference."""
    needs(dtype)
    model = odd_model(40, 5, 1, dtype=dtype)
    ids, mask, tokens = prompts(3, 7, 197, seed=11)
    runs, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            runs.append(run_steps(model, ids, mask, tokens, native_expected=True))
    finally:
        torch.set_num_threads(previous)
    for other in runs[1:]:
        for name, a, b in zip(("logits", "keys", "values"), runs[0], other):
            assert torch.equal(a, b), name
    model.fast_decode = False
    low = run_steps(model, ids, mask, tokens)
    model.double()
    expected = run_steps(model, ids, mask, tokens)
    logits = runs[0][0] if dtype == torch.float32 else runs[0][0].to(dtype)
    ref_low = low[0] if dtype == torch.float32 else low[0].to(dtype)
    assert_close(logits, expected[0], ref_low, name="logits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_equals_the_eager_path(dtype):
    needs(dtype)
    model = tiny_model(seed=3, dtype=dtype)
    ids, mask, _ = prompts(fast_decode.MAX_ROWS, 11, 199, seed=5)
    calls = []
    step = native.step

    def counting(*args, **kwargs):
        calls.append(args[0][0])
        return step(*args, **kwargs)

    native.step = counting
    try:
        fast = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    finally:
        native.step = step
    assert calls == [fast_decode.MAX_ROWS] * 5  # every decode step ran natively
    model.fast_decode = False
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]), fast)


def test_generate_checks_the_model_once_per_call(monkeypatch):
    """generate() takes sequence_steps: the plan is looked up before the steps, not per token."""
    needs(torch.float32)
    model = tiny_model(seed=3)
    ids, mask, _ = prompts(2, 7, 199, seed=2)
    lookups, steps = [], []
    real_plan, real_step = fast_decode._plan_for, native.step
    monkeypatch.setattr(fast_decode, "_plan_for", lambda *a: lookups.append(1) or real_plan(*a))
    monkeypatch.setattr(native, "step", lambda *a: steps.append(1) or real_step(*a))
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[])
    assert len(steps) == 8 and len(lookups) <= 2  # generate's will_run for packing, sequence_steps
    model.fast_decode = False
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[]), fast)


def test_sequence_steps_keep_to_their_cache():
    needs(torch.float32)
    model = tiny_model()
    ids, mask, tokens = prompts(2, 5, 199, seed=1)
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        _, positions = model.prefill(ids, None, None, mask, cache)
        step = fast_decode.sequence_steps(model, tokens[:, 0], positions, cache)
        with pytest.raises(ValueError, match="cache: expected the cache these steps were made for"):
            step(tokens[:, 0], positions, model.new_cache(2, 8))
        with pytest.raises(ValueError, match=r"tokens, positions: expected \(2,\) each"):
            fast_decode.sequence_steps(model, tokens[:1, 0], positions[:1], cache)


@pytest.mark.parametrize("padded", [False, True])
def test_positions_past_the_cache_and_the_key_mask(padded):
    """Positions beyond the cache's length (Qwen2-VL's after a video) grow the rotary tables; the
    step marks its slot real in the key mask, padded or not, as the eager step does."""
    needs(torch.float32)
    model = odd_model(40, 3, 1)
    ids, mask, tokens = prompts(2, 6, 197, seed=4)
    mask[:] = mask if padded else True
    results = []
    for fast in (True, False):
        model.fast_decode = fast
        with torch.inference_mode():
            cache = model.new_cache(2, 10)
            _, positions = model.prefill(ids, None, None, mask, cache)
            positions += 50  # far past the 10 slots
            logits = [model.decode_step(tokens[:, i], positions + i, cache, padded=padded) for i in range(3)]
            results.append((torch.stack(logits), cache.key_mask.clone()))
    (fast_logits, fast_mask), (eager_logits, eager_mask) = results
    assert torch.equal(fast_mask, eager_mask) and bool(fast_mask[:, 6:9].all())
    torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_weights_changed_in_place_or_moved_are_seen():
    needs(torch.float32)
    model = odd_model(40, 3, 1)
    ids, mask, tokens = prompts(2, 5, 197, seed=1)
    run_steps(model, ids, mask, tokens)  # builds and keeps the plan
    with torch.no_grad():
        model.model.text_model.layers[1].mlp.down_proj.weight.mul_(3.0)
        model.lm_head.weight.data = model.lm_head.weight.data * 0.5  # a new storage
    fast = run_steps(model, ids, mask, tokens, native_expected=True)
    model.fast_decode = False
    eager = run_steps(model, ids, mask, tokens)
    for actual, expected in zip(fast, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_falls_back_to_the_eager_path(monkeypatch):
    needs(torch.float32)
    model = tiny_model()
    tokens = torch.ones(2, dtype=torch.long)
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        assert fast_decode.will_run(model, tokens, cache)
        assert not fast_decode.will_run(model, torch.ones(fast_decode.MAX_ROWS + 1, dtype=torch.long),
                                        model.new_cache(fast_decode.MAX_ROWS + 1, 8))
        assert not fast_decode.will_run(model, tokens, model.new_cache(2, 8).__class__(
            2, 2, 2, 8, 12, dtype=torch.float64))  # a cache in another dtype
        monkeypatch.setenv("VLMFAST_BACKEND", "reference")
        assert not fast_decode.will_run(model, tokens, cache)
        monkeypatch.delenv("VLMFAST_BACKEND")
        handle = model.model.text_model.layers[0].self_attn.qkv.register_forward_hook(lambda *a: None)
        assert not fast_decode.will_run(model, tokens, cache)  # a hook must see the eager call
        handle.remove()
        assert fast_decode.will_run(model, tokens, cache)
    with torch.enable_grad():
        assert not fast_decode.will_run(model, tokens, cache)


def test_greedy_generate_equals_transformers(tmp_path):
    """float32, rows with images of different sizes (split and unsplit) and left padding, a
    batch the native step takes and batch 1: token for token transformers' greedy generate."""
    needs(torch.float32)
    transformers = pytest.importorskip("transformers")
    from tests.models.smolvlm_helpers import PAD, build_batch, hf_config_dict

    torch.manual_seed(0)
    hf = transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**hf_config_dict())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ours = SmolVLM.from_pretrained(tmp_path)
    rows = [(5, 3, 4, None), (1, 6, 2, (20, 28))][: fast_decode.MAX_ROWS]
    for batch in (rows, rows[:1]):
        ids, mask, pixels, pixel_mask = build_batch(batch, seed=len(batch))
        with torch.inference_mode():
            assert fast_decode.will_run(ours, ids[:, -1], ours.new_cache(len(batch), ids.shape[1] + 8))
        actual = ours.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
        with torch.no_grad():
            expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                   pixel_attention_mask=pixel_mask, do_sample=False, max_new_tokens=8,
                                   min_new_tokens=8, pad_token_id=PAD)
        assert torch.equal(actual, expected), (actual[:, ids.shape[1]:], expected[:, ids.shape[1]:])


def test_compiled_decode_step_traces_the_eager_path():
    needs(torch.float32)
    model = tiny_model()
    ids, mask, tokens = prompts(2, 5, 199, seed=2)
    expected = run_steps(model, ids, mask, tokens, steps=1)[0]
    step = model.decode_step
    model.decode_step = torch.compile(step, fullgraph=True, dynamic=False)
    try:
        actual = run_steps(model, ids, mask, tokens, steps=1)[0]
    finally:
        model.decode_step = step
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
