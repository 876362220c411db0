"""SmolVLM loaded from random-weight transformers checkpoints (SmolVLM / SmolVLM2 and Idefics3
layouts) gives transformers' logits (ours in float32 against transformers in float64, 1e-5
relative), its greedy generate token for token (batch of 3, left padding, split and unsplit
images, a padded tile), and its loss and gradients; bad input raises ValueError naming the
argument."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Idefics3Config, Idefics3ForConditionalGeneration  # noqa: E402
from transformers import SmolVLMConfig as HFSmolVLMConfig  # noqa: E402
from transformers import SmolVLMForConditionalGeneration  # noqa: E402

from tests.models.smolvlm_helpers import (  # noqa: E402
    IMAGE_SEQ_LEN, IMAGE_SIZE, IMAGE_TOKEN, PAD, build_batch, hf_config_dict,
)
from tests.tolerance import assert_close  # noqa: E402
from vlmfast.models.smolvlm import SmolVLM, SmolVLMConfig  # noqa: E402
from vlmfast.models.smolvlm.vision import bucketised_position_ids  # noqa: E402

transformers.logging.set_verbosity_error()

LAYOUTS = {
    "smolvlm-gqa": (HFSmolVLMConfig, SmolVLMForConditionalGeneration, dict()),
    "smolvlm-tied-mha-hd40": (HFSmolVLMConfig, SmolVLMForConditionalGeneration, dict(tied=True, kv_heads=4, head_dim=40)),
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, dict()),
}

# (tiles, text before, text after, valid pixels of the last tile): a 2 x 2 split + global image,
# one unsplit image, one image smaller than a tile (5 x 3 of 4 x 4 patches, partly covered)
ROWS = [(5, 3, 4, None), (1, 7, 2, None), (1, 2, 9, (17, 24))]


def _randomise_norms(hf):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.1)


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def pair(request, tmp_path_factory):
    config_cls, model_cls, options = LAYOUTS[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**hf_config_dict(**options))).eval()
    _randomise_norms(hf)
    path = tmp_path_factory.mktemp("smolvlm") / request.param
    hf.save_pretrained(path)
    return hf, SmolVLM.from_pretrained(path), path


def _hf_logits64(hf, **inputs):
    hf64 = hf.double()
    try:
        with torch.no_grad():
            args = {k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()}
            return hf64(**args).logits
    finally:
        hf.float()


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids, _, pixels, pixel_mask = build_batch(ROWS, seed=1)
    expected = _hf_logits64(hf, input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    with torch.no_grad():
        actual = ours(ids, pixels, pixel_mask)
    assert actual.shape == (3, ids.shape[1], hf.config.text_config.vocab_size)
    assert_close(actual, expected, name="logits")


def test_bfloat16_logits_within_twice_transformers_error(pair):
    """bf16: our error against float64 transformers is at most 2x transformers' own bf16 error
    (the DESIGN.md rule), on the real tokens of a left-padded batch with images."""
    import copy

    hf, _, path = pair
    ours = SmolVLM.from_pretrained(path, dtype=torch.bfloat16)
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=6)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_attention_mask=pixel_mask)
    expected = _hf_logits64(hf, pixel_values=pixels, **inputs)
    with torch.no_grad():
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(pixel_values=pixels.bfloat16(), **inputs).logits
        actual = ours(ids, pixels, pixel_mask, mask)
    valid = mask.bool()
    assert actual.dtype == torch.bfloat16
    assert_close(actual[valid], expected[valid], hf_bf16[valid], name="bf16 logits")


def test_logits_left_padded_and_text_only(pair):
    hf, ours, _ = pair
    ids, mask, _, _ = build_batch([(0, 9, 0, None), (0, 4, 0, None), (0, 1, 0, None)], seed=2)
    expected = _hf_logits64(hf, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        actual = ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert torch.isfinite(actual).all()
    assert_close(actual[valid], expected[valid], name="logits on real tokens")


def test_pixel_mask_none_equals_all_ones(pair):
    _, ours, _ = pair
    ids, _, pixels, _ = build_batch([(5, 2, 2, None), (1, 3, 3, None)], seed=3)
    with torch.no_grad():
        a = ours(ids, pixels)
        b = ours(ids, pixels, (pixels != 0).any(dim=2).long())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=4)
    kw = dict(max_new_tokens=8, pad_token_id=PAD)
    # a stop token that the first row emits mid-way: that row is padded after it, the others go on
    free = ours.generate(ids, pixels, pixel_mask, mask, eos_token_id=[], **kw)
    stop = int(free[0, ids.shape[1] + 3])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                               pixel_attention_mask=pixel_mask, do_sample=False, eos_token_id=stop, **kw)
    actual = ours.generate(ids, pixels, pixel_mask, mask, eos_token_id=stop, **kw)
    assert torch.equal(actual, expected), (actual[:, ids.shape[1]:], expected[:, ids.shape[1]:])
    assert actual.shape[1] == ids.shape[1] + 8 and (actual[0, ids.shape[1] + 4:] == PAD).all()


def test_sampling_matches_transformers_for_the_same_seed(pair):
    """temperature, top-k and top-p: the same draws as transformers' for the same torch seed."""
    hf, ours, _ = pair
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=11)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, pad_token_id=PAD)
    for seed in range(2):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                   pixel_attention_mask=pixel_mask, eos_token_id=None, **kw)
        torch.manual_seed(seed)
        assert torch.equal(ours.generate(ids, pixels, pixel_mask, mask, eos_token_id=[], **kw), expected)


def test_processed_images_match_transformers(pair):
    """uint8 images of different sizes through vlmfast's SmolVLM image processor (split into
    2 x 2, 2 x 1, 1 x 2 tiles + global images, one image unsplit; samples padded with empty
    frames), then ours against transformers: logits and greedy generate."""
    import numpy as np
    from PIL import Image

    from vlmfast.processing.smolvlm import SmolVLMImageProcessor

    hf, ours, _ = pair
    rng = np.random.default_rng(0)
    image = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    split = SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    whole = SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                  do_image_splitting=False)
    images = [[image(50, 70)], [image(64, 30)], [image(20, 64), image(33, 33)]]
    tiled, tiled_u8 = split(images), split(images, output="uint8")
    narrow = [[image(40, 21)]]
    single, single_u8 = whole(narrow), whole(narrow, output="uint8")
    frames = [2 * 2 + 1, 2 * 1 + 1, (1 * 2 + 1) + (2 * 2 + 1), 1]
    count = max(frames)
    pixels = torch.zeros(4, count, 3, IMAGE_SIZE, IMAGE_SIZE)
    pixel_mask = torch.zeros(4, count, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    pixels[:3, : tiled.pixel_values.shape[1]] = tiled.pixel_values
    pixel_mask[:3, : tiled.pixel_values.shape[1]] = tiled.pixel_attention_mask
    pixels[3, :1], pixel_mask[3, :1] = single.pixel_values[0], single.pixel_attention_mask[0]
    assert [int(f) for f in (pixel_mask.flatten(2).any(-1)).sum(1)] == frames
    ids, mask, _, _ = build_batch([(n, 3 + b, 2, None) for b, n in enumerate(frames)], seed=9)
    expected = _hf_logits64(hf, input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    with torch.no_grad():
        actual = ours(ids, pixels, pixel_mask, mask)
    valid = mask.bool()
    assert_close(actual[valid], expected[valid], name="logits")
    # the same images as decoded uint8 (B, N, H, W, C): normalised inside the patch embedding
    decoded = torch.zeros(4, count, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    decoded[:3, : tiled_u8.pixel_values.shape[1]] = tiled_u8.pixel_values
    decoded[3, :1] = single_u8.pixel_values[0]
    with torch.no_grad():
        from_uint8 = ours(ids, decoded, pixel_mask, mask)
    assert_close(from_uint8[valid], expected[valid], name="logits from uint8 images")
    with torch.no_grad():
        generated = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask,
                                do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours.generate(ids, pixels, pixel_mask, mask, max_new_tokens=6, eos_token_id=[]), generated)


def test_loss_and_gradients_match_transformers(pair):
    hf, _, path = pair
    ours = SmolVLM.from_pretrained(path).train()
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=5)
    labels = torch.where(mask.bool() & (ids != IMAGE_TOKEN), ids, torch.full_like(ids, -100))
    labels[1, -3] = -100
    hf.zero_grad()
    expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask,
                  labels=labels).loss
    expected.backward()
    actual = ours.loss(ids, labels, pixels, pixel_mask, mask)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    missing = [n for n, p in ours.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in [
        ("model.text_model.embed_tokens.weight", "model.text_model.embed_tokens.weight"),
        ("model.vision_model.embeddings.patch_embedding.weight", "model.vision_model.embeddings.patch_embedding.weight"),
        ("model.connector.modality_projection.proj.weight", "model.connector.modality_projection.proj.weight"),
        ("model.text_model.layers.0.input_layernorm.weight", "model.text_model.layers.0.input_layernorm.weight"),
    ]:
        torch.testing.assert_close(dict(ours.named_parameters())[ours_name].grad, hf_params[hf_name].grad,
                                   rtol=1e-4, atol=1e-6, msg=ours_name)
    E = ours.config.text_config.num_attention_heads * ours.config.text_config.head_dim
    q_grad = ours.model.text_model.layers[1].self_attn.qkv.weight.grad[:E]
    torch.testing.assert_close(q_grad, hf.model.text_model.layers[1].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    I = ours.config.text_config.intermediate_size
    up_grad = ours.model.text_model.layers[0].mlp.gate_up.weight.grad[I:]
    torch.testing.assert_close(up_grad, hf.model.text_model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("valid", [(4, 4), (1, 1), (3, 2), (2, 4), (4, 3)])
def test_bucketised_positions_match_transformers(valid):
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig as HFVision

    side, patch = 7, 4  # 7 patches per side: bucket edges at sevenths, uneven against 2, 3, 4
    emb = SmolVLMVisionEmbeddings(HFVision(hidden_size=side * side, image_size=side * patch, patch_size=patch))
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.eye(side * side))  # one-hot: the output is the position id
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, : valid[0], : valid[1]] = True
    with torch.no_grad():
        ids_hf = emb(torch.zeros(1, 3, 4 * patch, 4 * patch), mask).argmax(-1)
    ids_hf[~mask.view(1, -1)] = 0
    assert torch.equal(bucketised_position_ids(mask, side), ids_hf)


# ----------------------------------------------------------------------------- defaults, bad input

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(HFSmolVLMConfig(**hf_config_dict())).eval()
    path = tmp_path_factory.mktemp("smolvlm-bad")
    hf.save_pretrained(path)
    return SmolVLM.from_pretrained(path), path, hf


def test_generate_defaults_follow_the_checkpoint(tiny):
    """No eos / pad given: both take the checkpoint's generation_config.json (eos 2, pad 0)."""
    model, path, hf = tiny
    assert (path / "generation_config.json").is_file()
    assert model.generation_defaults == {"eos_token_id": hf.generation_config.eos_token_id,
                                         "pad_token_id": hf.generation_config.pad_token_id}
    ids, mask, pixels, pixel_mask = build_batch([(1, 2, 3, None), (0, 3, 1, None)], seed=7)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, :1],
                               pixel_attention_mask=pixel_mask[:, :1], do_sample=False, max_new_tokens=5)
    assert torch.equal(model.generate(ids, pixels[:, :1], pixel_mask[:, :1], mask, max_new_tokens=5), expected)
    # no attention_mask: padding inferred from the pad id (row 1 is left-padded with PAD = 0)
    assert (ids[1] == PAD).any()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels[:, :1], pixel_attention_mask=pixel_mask[:, :1],
                               do_sample=False, max_new_tokens=5)
    assert torch.equal(model.generate(ids, pixels[:, :1], pixel_mask[:, :1], max_new_tokens=5), expected)


def test_auto_dtype_loads_in_the_preferred_dtype(tiny):
    from vlmfast.models.smolvlm.model import preferred_dtype

    _, path, _ = tiny
    model = SmolVLM.from_pretrained(path, dtype="auto")
    flags = open("/proc/cpuinfo").read().split()
    expected = torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
    assert preferred_dtype("cpu") == expected == model.dtype
    assert all(p.dtype == expected for p in model.parameters())


def test_plain_torch_fallbacks_give_the_same_answer(tiny, monkeypatch):
    """With no fused op (vlmfast/models/smolvlm/_ops.py's fallbacks), the same logits and loss."""
    from vlmfast.models.smolvlm import _ops

    model, *_ = tiny
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=8)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        fused = model(ids, pixels, pixel_mask, mask), model.loss(ids, labels, pixels, pixel_mask, mask)
        monkeypatch.setattr(_ops, "_op", lambda name: None)
        plain = model(ids, pixels, pixel_mask, mask), model.loss(ids, labels, pixels, pixel_mask, mask)
    valid = mask.bool()
    torch.testing.assert_close(fused[0][valid], plain[0][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_cpu_weights(dtype):
    """pack_weights: the same logits (bf16: the same oneDNN kernels; fp32: rounding only), the
    same greedy tokens; a weight changed in place or a dtype change falls back to the plain path;
    gradients never use the packed copy."""
    from tests.models.smolvlm_helpers import tiny_model
    from vlmfast.models.smolvlm import packing

    if not packing.available(dtype):
        pytest.skip(f"no oneDNN packing for {dtype} here")
    model = tiny_model(seed=2, dtype=dtype)
    model.auto_pack = False
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=10)
    with torch.no_grad():
        plain = model(ids, pixels, pixel_mask, mask)
        plain_tokens = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[])
        assert model.pack_weights()
        packed = model(ids, pixels, pixel_mask, mask)
        packed_tokens = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[])
    valid = mask.bool()
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[valid], plain[valid], **tol)
    assert torch.equal(packed_tokens, plain_tokens)
    qkv = model.model.text_model.layers[0].self_attn.qkv
    with torch.no_grad():
        qkv.weight.mul_(1.5)  # stale packed copy: must not be used
        changed = model(ids, pixels, pixel_mask, mask)
        model.unpack_weights()
        expected = model(ids, pixels, pixel_mask, mask)
        model.pack_weights()
    torch.testing.assert_close(changed[valid], expected[valid], **tol)
    loss = model.loss(ids, torch.where(valid, ids, -100), pixels, pixel_mask, mask)
    loss.backward()
    assert qkv.weight.grad is not None and torch.isfinite(qkv.weight.grad).all()
    model.to(torch.float64)  # a dtype change: the packed copies go stale, float64 runs plainly
    with torch.no_grad():
        assert model(ids, pixels.double(), pixel_mask, mask).dtype == torch.float64


def test_image_normalization_from_the_checkpoint(tiny, tmp_path):
    _, path, _ = tiny
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(path / name)
    assert SmolVLM.from_pretrained(tmp_path).image_normalization == ((0.5,) * 3, (0.5,) * 3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6],
                                                                 "image_std": [0.2, 0.3, 0.25]}))
    assert SmolVLM.from_pretrained(tmp_path).image_normalization == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))


def test_image_token_count_mismatch(tiny):
    model, *_ = tiny
    ids, mask, pixels, pixel_mask = build_batch([(1, 2, 2, None), (5, 2, 2, None)])
    with pytest.raises(ValueError, match=r"input_ids: expected image_seq_len=4 image tokens .* \[4, 4\] per row .* got \[4, 20\]"):
        model(ids, pixels[:, :1], pixel_mask[:, :1])
    with pytest.raises(ValueError, match="input_ids: expected image_seq_len"):
        model(ids)  # image tokens but no images
    ids[0, -1] = IMAGE_TOKEN
    with pytest.raises(ValueError, match="input_ids: expected image_seq_len"):
        model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=2)


def test_prompt_too_long_for_cache(tiny):
    model, *_ = tiny
    ids, mask, _, _ = build_batch([(0, 6, 0, None), (0, 4, 0, None)])
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="input_ids: 9 more tokens after 0 cached do not fit the cache's max_len=8"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, cache=cache)
    with pytest.raises(ValueError, match="input_ids: expected a batch of 2 rows"):
        model.generate(ids[:1], max_new_tokens=1, cache=cache)


def test_unknown_checkpoint_layout(tiny, tmp_path):
    _, path, _ = tiny
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="config.json: model_type expected one of .*got 'llava'"):
        SmolVLM.from_pretrained(tmp_path)
    text = {**config["text_config"], "model_type": "mistral"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_config": text}))
    with pytest.raises(ValueError, match="text_config.model_type expected one of .*got 'mistral'"):
        SmolVLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="path: expected a checkpoint directory"):
        SmolVLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("case, match", [
    ("ids_rank", r"input_ids: expected \(B, L\) token ids, got \(6\)"),
    ("ids_float", "input_ids: expected an integer tensor"),
    ("pixels_rank", r"pixel_values: expected \(B, N, C, H, W\) = \(2, N, 3, H, W\), got \(2, 3, 32, 32\)"),
    ("pixels_patch", "pixel_values: expected H and W multiples of patch_size=8, got 30 x 32"),
    ("pixels_uint8_layout", r"pixel_values: expected uint8 \(B, N, H, W, C\) = \(2, N, H, W, 3\), got \(2, 1, 3, 32, 32\)"),
    ("pixels_not_square", r"pixel_values: expected square tiles \(H == W\) of a multiple of patch_size \* scale_factor = 16"),
    ("pixel_mask", r"pixel_attention_mask: expected \(B, N, H, W\) = \(2, 1, 32, 32\), got \(2, 32, 32\)"),
    ("attention_mask", r"attention_mask: expected \(B, L\) = \(2, 10\), got \(2, 9\)"),
    ("labels", r"labels: expected the shape of input_ids \(2, 10\), got \(2, 9\)"),
])
def test_bad_input_names_the_argument(tiny, case, match):
    model, *_ = tiny
    ids, mask, pixels, pixel_mask = build_batch([(1, 3, 3, None), (1, 2, 4, None)])
    with pytest.raises((ValueError, TypeError), match=match):
        if case == "ids_rank":
            model(ids[0, :6])
        elif case == "ids_float":
            model(ids.float())
        elif case == "pixels_rank":
            model(ids, pixels[:, 0])
        elif case == "pixels_patch":
            model(ids, pixels[..., :30, :])
        elif case == "pixels_uint8_layout":
            model(ids, pixels.to(torch.uint8))
        elif case == "pixels_not_square":
            model(ids, pixels[..., :16, :])
        elif case == "pixel_mask":
            model(ids, pixels, pixel_mask[:, 0])
        elif case == "attention_mask":
            model(ids, pixels, pixel_mask, mask[:, 1:])
        else:
            model.loss(ids, ids[:, 1:], pixels, pixel_mask)


def test_public_name():
    import vlmfast.models

    assert vlmfast.models.SmolVLM is SmolVLM


def test_image_seq_len_from_config():
    cfg = SmolVLMConfig.from_hf({"model_type": "smolvlm", "scale_factor": 4,
                                 "vision_config": {"image_size": 512, "patch_size": 16, "hidden_size": 768,
                                                   "num_attention_heads": 12},
                                 "text_config": {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9}})
    assert cfg.image_seq_len == 64 == (512 // 16) ** 2 // 4**2
    assert IMAGE_SEQ_LEN == 4
    with pytest.raises(ValueError, match="scale_factor: expected a divisor of the 32 patches per tile side"):
        SmolVLMConfig.from_hf({"model_type": "smolvlm", "scale_factor": 3,
                               "vision_config": {"image_size": 512, "patch_size": 16}})


# ----------------------------------------------------------------------------- real dimensions

@pytest.mark.parametrize("image_size", [
    64,  # a 64 x 64 tile (4 x 4 patches -> 1 token) through the full-size tower: fast
    pytest.param(512, marks=pytest.mark.skipif(os.environ.get("VLMFAST_SLOW") != "1", reason="VLMFAST_SLOW=1")),
])
def test_smolvlm2_256m_dimensions_build_and_run(image_size):
    """SmolVLM2-256M's shapes (SigLIP 768 x 12 layers, patch 16 at 512, scale 4; a SmolLM2-135M
    decoder: 576 wide, 30 layers, 9 heads over 3 kv heads, vocab 49280), built from a config
    (bf16, random weights): one forward over one image and a prompt, and two decode steps."""
    cfg = SmolVLMConfig.from_hf({
        "model_type": "smolvlm", "scale_factor": 4, "image_token_id": 49190, "tie_word_embeddings": False,
        "vision_config": {"model_type": "smolvlm_vision", "hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
        "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192},
    })
    with torch.device("meta"):
        model = SmolVLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    # random weights by copying windows of one random pool: drawing 256M normals takes seconds
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat, offset = p.view(-1), (i * 7919) % 1000
            for start in range(0, flat.numel(), pool.numel() - offset):
                n = min(pool.numel() - offset, flat.numel() - start)
                flat[start:start + n] = pool[offset:offset + n]
    n_params = sum(p.numel() for p in model.parameters())
    assert 250e6 < n_params < 260e6, n_params
    assert cfg.image_seq_len == 64
    tokens = (image_size // 16 // 4) ** 2
    ids = torch.cat([torch.randint(0, 49000, (1, 5)), torch.full((1, tokens), 49190), torch.randint(0, 49000, (1, 7))], 1)
    L = ids.shape[1]
    pixels = torch.randn(1, 1, 3, image_size, image_size, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(ids, pixels)
    assert logits.shape == (1, L, 49280) and torch.isfinite(logits).all()
    out = model.generate(ids, pixels, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, L + 3) and torch.equal(out[:, :L], ids)
    assert torch.equal(out[0, L], logits[0, -1].argmax())
