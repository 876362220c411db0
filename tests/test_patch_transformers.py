"""vlmfast.patch_transformers: a transformers CLIP / SigLIP / SmolVLM model patched in place gives
the same outputs and gradients as before, and really runs vlmfast's attention and patch embedding."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.models.smolvlm_helpers import build_batch, hf_config_dict  # noqa: E402
from vlmfast.ops import _dispatch  # noqa: E402
from vlmfast.patching_transformers import VlmfastPatchConv2d  # noqa: E402

# Odd sizes on purpose: head dim 10 (40 / 4), 7 text tokens, 3 x 3 = 9 patches + class token.
TEXT = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=99, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=24, patch_size=8)


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                               projection_dim=24))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION))
    return model.eval()


def _inputs(masked: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 7), generator=g)
    ids[:, -1] = 98  # CLIP pools at the highest id (its eos under the legacy rule)
    mask = torch.ones(3, 7, dtype=torch.long)
    if masked:
        ids[1, 4:], mask[1, 4:] = 0, 0
        ids[1, 3] = 98
    pixels = torch.randn(3, 3, 24, 24, generator=g)  # the loss pairs text i with image i
    return dict(input_ids=ids, attention_mask=mask if masked else None, pixel_values=pixels)


def _attention_calls() -> int:
    return sum(n for (op, _), n in _dispatch.calls.items() if op == "attention")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_outputs_and_gradients_equal(kind, masked):
    reference = _tiny(kind)
    patched = vlmfast.patch_transformers(copy.deepcopy(reference))
    inputs = _inputs(masked)

    want = reference(**inputs, return_loss=True)
    attention_before = _attention_calls()
    patch_before = sum(n for (op, _), n in _dispatch.calls.items() if op == "patch_embed")
    got = patched(**inputs, return_loss=True)
    # 2 vision + 2 text layers ran vlmfast's attention, the vision tower its patch embedding.
    assert _attention_calls() - attention_before == 4
    assert sum(n for (op, _), n in _dispatch.calls.items() if op == "patch_embed") - patch_before == 1

    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)

    want.loss.backward()
    got.loss.backward()
    grads = dict(patched.named_parameters())
    for name, p in reference.named_parameters():
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_patch_is_in_place_idempotent_and_keeps_state_dict():
    model = _tiny("clip")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert vlmfast.patch_transformers(model) is model
    assert vlmfast.patch_transformers(model) is model
    conv = model.vision_model.embeddings.patch_embedding
    assert type(conv) is VlmfastPatchConv2d
    for config in (model.config, model.config.text_config, model.config.vision_config):
        assert config._attn_implementation == "vlmfast"
    assert model.state_dict().keys() == state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    inputs = _inputs(True)
    torch.testing.assert_close(model(**inputs).logits_per_image,
                               _tiny("clip")(**inputs).logits_per_image, rtol=1e-5, atol=1e-5)


def test_single_tower_models():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    pixels = _inputs(False)["pixel_values"]
    want = vision(pixel_values=pixels).pooler_output
    got = vlmfast.patch_transformers(vision)(pixel_values=pixels).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch_embedding_falls_back_for_uncovered_sizes():
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    images = torch.randn(2, 3, 10, 12)  # 10 is not a multiple of 4: the conv floors it
    want = conv(images)
    conv.__class__ = VlmfastPatchConv2d
    torch.testing.assert_close(conv(images), want)
    images = torch.randn(2, 3, 12, 8)
    torch.testing.assert_close(conv(images), torch.nn.functional.conv2d(images, conv.weight, conv.bias, stride=4),
                               rtol=1e-5, atol=1e-5)


def test_smolvlm_outputs_and_gradients_equal():
    cfg = transformers.SmolVLMConfig(**hf_config_dict())
    torch.manual_seed(0)
    reference = transformers.SmolVLMForConditionalGeneration(cfg).eval()
    patched = vlmfast.patch_transformers(copy.deepcopy(reference))
    ids, mask, pixels, pixel_mask = build_batch([(1, 3, 2, None), (1, 1, 4, None)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    want = reference(**inputs).logits
    before = _attention_calls()
    got = patched(**inputs).logits
    assert _attention_calls() - before == 4  # 2 vision + 2 decoder layers (GQA, no repeat_kv)
    valid = mask.bool()  # padded positions' logits are not compared: they attend nothing useful
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)
    want[valid].square().mean().backward()
    got[valid].square().mean().backward()
    grads = dict(patched.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="model: expected a transformers CLIP, SigLIP or SmolVLM"):
        vlmfast.patch_transformers(torch.nn.Linear(2, 2))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16))
    with pytest.raises(TypeError, match="model_type 'bert'"):
        vlmfast.patch_transformers(bert)


def test_patched_model_saves_a_plain_checkpoint(tmp_path):
    model = vlmfast.patch_transformers(_tiny("clip"))
    model.save_pretrained(tmp_path)
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation != "vlmfast"
    assert type(reloaded.vision_model.embeddings.patch_embedding) is torch.nn.Conv2d
    inputs = _inputs(True)
    torch.testing.assert_close(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image,
                               rtol=1e-5, atol=1e-5)
