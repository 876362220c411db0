"""LoRA adapters and freezing: a fresh adapter changes nothing; a trained one equals the float64
formula applied to the unfused projections (peft's), and its merge; only adapters get gradients;
an adapter on one part of a fused qkv / gate_up layer changes only that part's rows; SmolVLM (GQA)
and CLIP; merged models save and load back; bad arguments are named."""

import os

import pytest
import torch
from torch import nn

from tests.models.smolvlm_helpers import build_batch, tiny_model
from vlmfast.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlmfast.train import TrainConfig, Trainer, apply_lora, freeze, lora_parameters, lora_state_dict, merge_lora
from vlmfast.train.freeze import trainable_parameters
from vlmfast.train.lora import KNOWN_TARGETS, LoRALinear

from tests.tolerance import assert_close

ROWS = [(1, 3, 4, None), (2, 2, 3, (20, 12))]  # SmolVLM batch: one image; two images, the last one cropped


def tiny_clip():
    text = TextConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=7, eos_token_id=29)
    vision = VisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                          image_size=12, patch_size=4)
    torch.manual_seed(0)
    return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


def clip_inputs(batch=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 29, (batch, 7), generator=g)
    ids[:, -1] = 29
    return torch.randn(batch, 3, 12, 12, generator=g), ids


def clip_outputs(model, pixels, ids):
    return torch.cat([model.encode_image(pixels), model.encode_text(ids)])


def smolvlm_batch():
    ids, attention_mask, pixels, pixel_mask = build_batch(ROWS)
    return ids, pixels, pixel_mask, attention_mask


def perturb(model, std=0.2, seed=1):
    """Non-zero B (and fresh A) so that the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- forward


def test_fresh_adapters_change_nothing():
    model = tiny_model()
    batch = smolvlm_batch()
    with torch.no_grad():
        before = model(*batch)
        # 2 decoder layers (qkv, o_proj, gate_up, down_proj) + 2 vision layers (qkv, out_proj, fc1, fc2)
        assert apply_lora(model, rank=4) == 2 * 4 + 2 * 4
        # not bit-equal: an adapted fc1 applies its activation after the low-rank term, outside the
        # GEMM's fused epilogue (a different but float32-exact-to-rounding gelu)
        torch.testing.assert_close(model(*batch), before, rtol=1e-5, atol=1e-5)
    clip, (pixels, ids) = tiny_clip(), clip_inputs()
    with torch.no_grad():
        before = clip_outputs(clip, pixels, ids)
        apply_lora(clip)
        torch.testing.assert_close(clip_outputs(clip, pixels, ids), before, rtol=1e-5, atol=1e-5)


def peft_reference(x, weight, bias, slices, adapters, scaling):
    """float64: every projection (q, k, v / gate, up / the whole layer) on its own, as peft runs
    the unfused model: x W_p^T + b_p + scaling * x A_p^T B_p^T, concatenated in layout order."""
    x = x.double()
    outs = []
    for name, (start, stop) in slices.items():
        y = x @ weight[start:stop].double().T
        if bias is not None:
            y = y + bias[start:stop].double()
        if name in adapters:
            a, b = adapters[name]
            y = y + scaling * (x @ a.double().T) @ b.double().T
        outs.append(y)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("targets", [("k_proj",), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj")])
@pytest.mark.parametrize("length", [1, 113])
def test_fused_gqa_qkv_equals_the_unfused_formula(targets, length):
    model = tiny_model()
    apply_lora(model, rank=3, alpha=5.0, targets=targets, include="text_model")
    layer = model.model.text_model.layers[1].self_attn.qkv
    assert isinstance(layer, LoRALinear)
    # 4 query heads and 2 kv heads of 12: rows [48 | 24 | 24]
    assert layer.slices == {"q_proj": (0, 48), "k_proj": (48, 72), "v_proj": (72, 96)}
    perturb(model)
    x = torch.randn(3, length, 48)
    adapters = {name: (layer.lora_A[name], layer.lora_B[name]) for name in layer.adapted}
    expected = peft_reference(x, layer.weight, layer.bias, layer.slices, adapters, 5.0 / 3)
    with torch.no_grad():
        assert_close(layer(x), expected, name="lora qkv")
        from vlmfast.models.smolvlm import packing  # the call the decoder makes
        assert_close(packing.linear(x, layer, layer.weight, layer.bias), expected, name="packing.linear")


def test_gate_up_and_plain_layers_equal_the_unfused_formula():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=3.0, targets=("up_proj", "down_proj", "proj"))
    perturb(model)
    mlp = model.model.text_model.layers[0].mlp
    assert mlp.gate_up.adapted == ["up_proj"] and mlp.gate_up.slices == {"gate_proj": (0, 80), "up_proj": (80, 160)}
    for layer, width in ((mlp.gate_up, 48), (mlp.down_proj, 80), (model.model.connector.modality_projection.proj, 160)):
        x = torch.randn(2, 5, width)
        adapters = {name: (layer.lora_A[name], layer.lora_B[name]) for name in layer.adapted}
        with torch.no_grad():
            assert_close(layer(x), peft_reference(x, layer.weight, layer.bias, layer.slices, adapters, 1.5))


def test_bfloat16_adapters_within_the_tolerance_rule():
    model = tiny_model(dtype=torch.bfloat16)
    apply_lora(model, rank=4, targets=("q_proj", "v_proj"), include="text_model")
    perturb(model)
    layer = model.model.text_model.layers[0].self_attn.qkv
    x = torch.randn(2, 7, 48).to(torch.bfloat16)
    adapters = {name: (layer.lora_A[name], layer.lora_B[name]) for name in layer.adapted}
    expected = peft_reference(x, layer.weight, layer.bias, layer.slices, adapters, 4.0)
    # the same formula run in bf16 (per projection, as peft would)
    low = torch.cat([
        x @ layer.weight[s:e].T + ((x @ adapters[n][0].T) * 4.0) @ adapters[n][1].T if n in adapters
        else x @ layer.weight[s:e].T
        for n, (s, e) in layer.slices.items()
    ], dim=-1)
    with torch.no_grad():
        assert_close(layer(x), expected, low, name="bf16 lora qkv")


def test_lora_model_equals_its_merge_smolvlm_and_clip():
    model = tiny_model()
    apply_lora(model, rank=4, targets=KNOWN_TARGETS)
    perturb(model)
    batch = smolvlm_batch()
    with torch.no_grad():
        adapted = model(*batch)
        merge_lora(model)
        merged = model(*batch)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora" in key for key in model.state_dict())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)

    clip, (pixels, ids) = tiny_clip(), clip_inputs()
    apply_lora(clip, rank=2, targets=("q_proj", "out_proj", "fc2"))
    perturb(clip)
    with torch.no_grad():
        adapted = clip_outputs(clip, pixels, ids)
        merged = clip_outputs(merge_lora(clip), pixels, ids)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_packed_inference_weights_still_add_the_adapters():
    model = tiny_model()
    apply_lora(model, rank=4, include="text_model")
    perturb(model)
    batch = smolvlm_batch()
    with torch.no_grad():
        plain = model(*batch)
        model.pack_weights()
        packed = model(*batch)
        model.unpack_weights()
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)


def test_dropout_only_in_training():
    clip, (pixels, ids) = tiny_clip(), clip_inputs()
    apply_lora(clip, dropout=0.5)
    perturb(clip)
    with torch.no_grad():
        clip.eval()
        first, second = clip_outputs(clip, pixels, ids), clip_outputs(clip, pixels, ids)
        assert torch.equal(first, second)
        clip.train()
        torch.manual_seed(0)
        assert not torch.allclose(clip_outputs(clip, pixels, ids), first)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLMFAST_SLOW") != "1", reason="compiles for ~40 s; VLMFAST_SLOW=1")
def test_lora_model_compiles_in_one_graph():
    clip, (pixels, ids) = tiny_clip(), clip_inputs()
    apply_lora(clip, rank=2, targets=("q_proj", "v_proj", "fc1"))
    perturb(clip)
    compiled = torch.compile(clip.encode_image, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels), clip.encode_image(pixels), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- merge slices


def test_merge_changes_only_the_targeted_rows_of_fused_layers():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=2, alpha=4.0, targets=("k_proj", "gate_proj"), include="text_model")
    perturb(model)
    attn = model.model.text_model.layers[0].self_attn.qkv
    a, b = attn.lora_A["k_proj"].detach().clone(), attn.lora_B["k_proj"].detach().clone()
    merge_lora(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        changed = not torch.equal(after[key], before[key])
        if key.endswith("self_attn.qkv.weight") and "text_model" in key:
            w0, w1 = before[key], after[key]
            assert torch.equal(w1[:48], w0[:48]) and torch.equal(w1[72:], w0[72:]), key  # q, v rows untouched
            assert not torch.equal(w1[48:72], w0[48:72]), key
            if ".layers.0." in key:  # k rows: W_k + alpha/rank B A, what peft's merge gives
                torch.testing.assert_close(w1[48:72], w0[48:72] + 2.0 * b @ a)
        elif key.endswith("mlp.gate_up.weight"):
            assert torch.equal(after[key][80:], before[key][80:]) and changed, key  # up rows untouched
        else:
            assert not changed, key


def test_adapters_equal_low_rank_updates_of_transformers_unfused_projections(tmp_path):
    """peft's semantics end to end: our fused model with adapters gives the logits of transformers'
    SmolVLM (separate q/k/v, gate/up projections, GQA) whose projection p got W_p += alpha/r B_p A_p."""
    transformers = pytest.importorskip("transformers")
    from tests.models.smolvlm_helpers import hf_config_dict
    from vlmfast.models.smolvlm import SmolVLM
    from vlmfast.train.lora import lora_layers

    torch.manual_seed(0)
    hf = transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**hf_config_dict())).eval()
    hf.save_pretrained(tmp_path)
    ours = SmolVLM.from_pretrained(tmp_path)
    apply_lora(ours, rank=3, alpha=6.0, targets=KNOWN_TARGETS)
    perturb(ours)
    hf_modules = dict(hf.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            owner = name.rpartition(".")[0]  # ...self_attn (qkv), ...mlp (gate_up), or the layer's parent
            for target in layer.adapted:
                projection = hf_modules[f"{owner}.{target}"]
                projection.weight += 2.0 * layer.lora_B[target] @ layer.lora_A[target]
    ids, mask, pixels, pixel_mask = build_batch(ROWS)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
        got = ours(ids, pixels, pixel_mask, mask)
    valid = mask.bool()  # padded positions attend nothing useful: not compared
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- training


def test_gradients_reach_only_the_adapters():
    model = tiny_model()
    apply_lora(model, rank=4)
    perturb(model)
    ids, pixels, pixel_mask, attention_mask = smolvlm_batch()
    labels = ids.masked_fill(attention_mask == 0, -100)
    model.train()
    model.loss(ids, labels, pixels, pixel_mask, attention_mask).backward()
    adapters = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert trainable_parameters(model) == sum(p.numel() for p in lora_parameters(model))
    assert set(lora_state_dict(model)) == {n for n, p in model.named_parameters() if id(p) in adapters}


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        clip, (pixels, ids) = tiny_clip(), clip_inputs()
        apply_lora(clip, rank=2)
        perturb(clip)
        clip.set_gradient_checkpointing(checkpointing)
        clip.train()
        clip_outputs(clip, pixels, ids).square().sum().backward()
        grads.append([p.grad.clone() for p in lora_parameters(clip)])
    for with_, without in zip(grads[1], grads[0]):
        torch.testing.assert_close(with_, without)


def test_trainer_updates_only_the_adapters():
    clip = tiny_clip()
    base = {k: v.clone() for k, v in clip.state_dict().items()}
    apply_lora(clip, rank=4, targets=("q_proj", "v_proj", "fc1"))
    start = {k: v.clone() for k, v in lora_state_dict(clip).items()}

    def batches(step, micro):
        pixels, ids = clip_inputs(4)
        return pixels, ids, None

    losses = Trainer(clip, TrainConfig(steps=4, lr=1e-2, weight_decay=0.0), batches).fit()
    assert losses[-1] < losses[0]
    assert all(not torch.equal(v, start[k]) for k, v in lora_state_dict(clip).items() if ".lora_B." in k)
    for key, value in clip.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), key


# ----------------------------------------------------------------------------- save / load


def test_merged_clip_saves_and_loads_back(tmp_path):
    clip, (pixels, ids) = tiny_clip(), clip_inputs()
    apply_lora(clip, rank=4)
    perturb(clip)
    merge_lora(clip)
    clip.save_pretrained(tmp_path)
    again = CLIP.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(clip_outputs(again, pixels, ids), clip_outputs(clip, pixels, ids), rtol=0, atol=0)


def test_merged_smolvlm_saves_and_loads_back(tmp_path):
    from vlmfast.models.smolvlm import SmolVLM

    model = tiny_model()
    apply_lora(model, rank=4, targets=KNOWN_TARGETS)
    perturb(model)
    merge_lora(model)
    model.save_pretrained(tmp_path)
    again = SmolVLM.from_pretrained(tmp_path)
    batch = smolvlm_batch()
    with torch.no_grad():
        torch.testing.assert_close(again(*batch), model(*batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------- freeze


def test_freeze_parts_of_smolvlm():
    model = tiny_model()
    body = model.model
    vision = sum(p.numel() for p in body.vision_model.parameters())
    assert freeze(model, vision=True) == vision
    assert all(not p.requires_grad for p in body.vision_model.parameters())
    assert all(p.requires_grad for p in body.text_model.parameters()) and model.lm_head.weight.requires_grad
    embeddings = body.text_model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert freeze(model, embeddings=True) == embeddings
    assert not body.text_model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in body.text_model.layers.parameters())
    freeze(model, decoder=True, connector=True)
    assert trainable_parameters(model) == 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"rank: expected a positive int, got 0"),
    (dict(rank=2.5), r"rank: expected a positive int"),
    (dict(alpha=0), r"alpha: expected a positive"),
    (dict(dropout=1.0), r"dropout: expected a probability"),
    (dict(targets=("q_proj", "query")), r"targets: expected names among .* unknown \['query'\]"),
    (dict(targets=()), r"targets: expected names among"),
    (dict(targets=("gate_proj",)), r"targets: no Linear layer of CLIP matched \['gate_proj'\]"),
    (dict(include="nowhere"), r"targets: no Linear layer .* include='nowhere'"),
])
def test_bad_arguments_are_named(kwargs, match):
    clip = tiny_clip()
    with pytest.raises(ValueError, match=match):
        apply_lora(clip, **kwargs)
    assert all(p.requires_grad for p in clip.parameters())  # nothing frozen by a refused call


def test_bad_model_states_are_named():
    clip = tiny_clip()
    with pytest.raises(ValueError, match="model: has no LoRA adapters"):
        merge_lora(clip)
    apply_lora(clip)
    with pytest.raises(ValueError, match="model: already has LoRA adapters"):
        apply_lora(clip)
    with pytest.raises(TypeError, match="model: expected a SmolVLM"):
        freeze(clip, vision=True)
    with pytest.raises(TypeError, match="include: expected"):
        apply_lora(nn.Linear(2, 2), include=3)
