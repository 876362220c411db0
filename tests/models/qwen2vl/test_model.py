"""Qwen2-VL and Qwen2.5-VL loaded from random-weight transformers checkpoints: the packed vision
tower, logits (prompts with 0, 1 and 2 images, left padding; text only; videos), greedy and
sampled generation, the loss and its gradients, all against transformers' models (ours in
float32 against theirs in float64, the DESIGN.md 1e-5 relative rule)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.qwen2vl.helpers import VERSIONS, build_batch, hf_model  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402
from vlmfast.models.qwen2vl import Qwen2VL  # noqa: E402

transformers.logging.set_verbosity_error()

# (t, h, w) patch grids: not square, larger than a Qwen2.5 window (4 x 4 patches) on both sides,
# and two frames (a video's temporal patches run as separate attention segments)
GRIDS = [(1, 4, 6), (1, 8, 8), (2, 6, 10)]
ROWS = [[], [(1, 4, 6)], [(1, 8, 8), (1, 6, 10)]]  # 0, 1 and 2 images


@pytest.fixture(scope="module", params=VERSIONS)
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, Qwen2VL.from_pretrained(path), path


def _hf64(hf, **inputs):
    hf64 = copy.deepcopy(hf).double()
    with torch.no_grad():
        return hf64(**{k: (v.double() if v is not None and v.is_floating_point() else v)
                       for k, v in inputs.items()}).logits


def test_vision_tower_packs_every_image_into_one_attention_call(pair, monkeypatch):
    from vlmfast import ops

    hf, ours, _ = pair
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        expected = copy.deepcopy(hf).double().model.visual(pixels.double(), grid_thw=grid).pooler_output
    calls = []
    real = ops.attention_varlen
    monkeypatch.setattr(ops, "attention_varlen", lambda *a, **k: calls.append(a[3].numel() - 1) or real(*a, **k))
    with torch.no_grad():
        actual = ours.model.visual(pixels, GRIDS)
    assert_close(actual, expected, name="vision features")
    # one call per block, each with every segment of the batch (4 frames, or more windows)
    assert len(calls) == ours.config.vision_config.depth and min(calls) >= 4


def test_logits_match_transformers_with_0_1_2_images(pair):
    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, ROWS, seed=1)
    expected = _hf64(hf, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=types)
    with torch.no_grad():
        actual = ours(ids, pixels, grid, mask)
        given_types = ours(ids, pixels, grid, mask, mm_token_type_ids=types)
    valid = mask.bool()
    assert_close(actual[valid], expected[valid], name="logits")
    torch.testing.assert_close(given_types, actual, rtol=0, atol=0)


def test_text_only_left_padded(pair):
    hf, ours, _ = pair
    ids, mask, *_ = build_batch(hf.config, [[], [], []], seed=2)
    expected = _hf64(hf, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        actual = ours(ids, attention_mask=mask)
    assert_close(actual[mask.bool()], expected[mask.bool()], name="logits")


def test_video_logits(pair):
    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, [[(2, 4, 4)], [(4, 6, 4)]], seed=3, video=True)
    extra = {"second_per_grid_ts": torch.tensor([0.5, 1.5])} if ours.config.version == "qwen2_5_vl" else {}
    expected = _hf64(hf, input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid,
                     mm_token_type_ids=types, **extra)
    with torch.no_grad():
        actual = ours(ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid, **extra)
    assert_close(actual[mask.bool()], expected[mask.bool()], name="video logits")


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, ROWS, seed=4)
    kw = dict(max_new_tokens=8, pad_token_id=0)
    free = ours.generate(ids, pixels, grid, mask, eos_token_id=[], **kw)
    stop = int(free[1, ids.shape[1] + 3])  # a stop token row 1 emits mid-way: padded after it
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                               mm_token_type_ids=types, do_sample=False, eos_token_id=stop, **kw)
    actual = ours.generate(ids, pixels, grid, mask, eos_token_id=stop, **kw)
    assert torch.equal(actual, expected), (actual[:, ids.shape[1]:], expected[:, ids.shape[1]:])


def test_native_cpu_decode_matches_transformers(pair, monkeypatch):
    """Two rows: every decode step runs the native CPU decoder stack (smolvlm/fast_decode.py)."""

    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, [[(1, 6, 4)], []], seed=8)
    with torch.inference_mode():  # generate's mode: the native step never runs with gradients on
        native = ours.decodes_natively(ids[:, -1], ours.new_cache(2, ids.shape[1] + 6))
    if not native:
        pytest.skip("no native decode step on this CPU / build")
    from vlmfast.native import decode as native

    steps = []
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a, **k: steps.append(1) or real(*a, **k))
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                               mm_token_type_ids=types, do_sample=False, max_new_tokens=6, eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(ours.generate(ids, pixels, grid, mask, max_new_tokens=6, eos_token_id=[]), expected)
    assert len(steps) == 5


def test_generate_after_a_prompt_ending_in_image_tokens(pair):
    """The last prompt token is an image token: its three M-RoPE components differ, and every
    decode step continues each from there (transformers' +1 per component)."""
    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, [[(1, 4, 6)], [(1, 6, 4)]], seed=5)
    cut = ids.shape[1] - 6  # drop <vision_end> and the 5 text tokens after the last image
    ids, mask, types = ids[:, :cut], mask[:, :cut], types[:, :cut]
    assert (types[:, -1] == 1).all()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                               mm_token_type_ids=types, do_sample=False, max_new_tokens=5, eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(ours.generate(ids, pixels, grid, mask, max_new_tokens=5, eos_token_id=[]), expected)


def test_static_shapes_and_streaming_give_the_same_tokens(pair):
    """decode_step_static (the CUDA-graph step: M-RoPE offsets always added) and a streamer."""
    hf, ours, _ = pair
    ids, mask, pixels, grid, _ = build_batch(hf.config, [[(1, 4, 6)], [(1, 6, 4)]], seed=9)
    for cut in (0, 6):  # the prompt ending in text, then in image tokens (unequal components)
        prompt, valid = ids[:, :ids.shape[1] - cut], mask[:, :ids.shape[1] - cut]
        eager = ours.generate(prompt, pixels, grid, valid, max_new_tokens=5, eos_token_id=[])
        streamed = []
        static = ours.generate(prompt, pixels, grid, valid, max_new_tokens=5, eos_token_id=[], static_shapes=True,
                               streamer=streamed.append)
        assert torch.equal(static, eager)
        assert torch.equal(torch.stack(streamed, dim=1), eager[:, prompt.shape[1]:])


def test_sampling_matches_transformers_for_the_same_seed(pair):
    hf, ours, _ = pair
    ids, mask, pixels, grid, types = build_batch(hf.config, ROWS, seed=6)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, pad_token_id=0)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                               mm_token_type_ids=types, eos_token_id=None, **kw)
    torch.manual_seed(3)
    assert torch.equal(ours.generate(ids, pixels, grid, mask, eos_token_id=[], **kw), expected)


def test_loss_and_gradients_match_transformers(pair):
    hf, _, path = pair
    ours = Qwen2VL.from_pretrained(path).train()
    hf = copy.deepcopy(hf).train()
    ids, mask, pixels, grid, types = build_batch(hf.config, ROWS, seed=7)
    labels = torch.where(mask.bool() & (types == 0), ids, torch.full_like(ids, -100))
    expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=types, labels=labels).loss
    expected.backward()
    actual = ours.loss(ids, labels, pixels, grid, mask)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    missing = [n for n, p in ours.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    for name in ("model.language_model.embed_tokens.weight", "model.visual.patch_embed.proj.weight",
                 "model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight",
                 "model.language_model.layers.0.input_layernorm.weight", "lm_head.weight"):
        torch.testing.assert_close(mine[name].grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    text = ours.config.text_config
    q_rows = text.num_attention_heads * text.head_dim
    layer = ours.model.language_model.layers[1]
    torch.testing.assert_close(layer.self_attn.qkv.bias.grad[:q_rows],
                               hf.model.language_model.layers[1].self_attn.q_proj.bias.grad, rtol=1e-4, atol=1e-6)
    block = ours.model.visual.blocks[0].mlp
    if ours.config.version == "qwen2_5_vl":
        up = block.gate_up.weight.grad[ours.config.vision_config.mlp_hidden:]
        torch.testing.assert_close(up, hf.model.visual.blocks[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(block.fc1.weight.grad, hf.model.visual.blocks[0].mlp.fc1.weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_bfloat16_vision_tower_within_twice_transformers_error(pair):
    hf, _, path = pair
    ours = Qwen2VL.from_pretrained(path, dtype=torch.bfloat16)
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        expected = copy.deepcopy(hf).double().model.visual(pixels.double(), grid_thw=grid).pooler_output
        theirs = copy.deepcopy(hf).to(torch.bfloat16).model.visual(pixels.bfloat16(), grid_thw=grid).pooler_output
        actual = ours.model.visual(pixels.bfloat16(), GRIDS)
    assert actual.dtype == torch.bfloat16
    assert_close(actual, expected, theirs, name="bf16 vision features")
