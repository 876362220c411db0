"""Strict loading: every missing key, unexpected key and wrong shape is named; safetensors only;
the q/k/v fusion round-trips."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmfast.models import CLIP, CLIPConfig, SigLIP, TextConfig, VisionConfig
from vlmfast.models.checkpoint import hf_to_native, native_to_hf


def tiny_clip():
    text = TextConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=7, eos_token_id=29)
    vision = VisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                          image_size=12, patch_size=4)
    torch.manual_seed(0)
    return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


@pytest.fixture
def saved(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_round_trip_is_exact(saved):
    model, path = saved
    again = CLIP.from_pretrained(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    hf = native_to_hf(model.state_dict())
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in hf
    assert not any(".qkv." in k for k in hf)
    assert set(hf_to_native(hf)) == set(model.state_dict())


def test_missing_unexpected_and_wrong_shapes_are_all_listed(saved):
    _, path = saved
    state = load_file(path / "model.safetensors")
    del state["text_projection.weight"]
    del state["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["visual_projection.weight"] = torch.zeros(8, 15)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        CLIP.from_pretrained(path)
    message = str(err.value)
    assert "missing keys" in message and "text_projection.weight" in message
    assert "self_attn.qkv.bias" in message  # the fused tensor cannot be formed
    assert "unexpected keys" in message and "extra.weight" in message
    assert "self_attn.q_proj.bias" in message  # the q/v halves left over are reported too
    assert "wrong shapes" in message and "visual_projection.weight: expected (8, 16), got (8, 15)" in message


def test_only_safetensors_are_read(saved, tmp_path):
    model, path = saved
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        CLIP.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIP.from_pretrained(tmp_path / "nowhere")


def test_wrong_model_type_and_missing_shard(saved):
    _, path = saved
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        SigLIP.from_pretrained(path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        CLIP.from_pretrained(path)


def test_bad_inputs_name_the_argument(saved):
    model, _ = saved
    with pytest.raises(ValueError, match=r"pixel_values: expected \(B, 3, 12, 12\)"):
        model.encode_image(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_values: expected uint8 \(B, 12, 12, 3\)"):
        model.encode_image(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))
    with pytest.raises(TypeError, match="input_ids"):
        model.encode_text(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"input_ids: expected \(B, L\) with 1 <= L <= 7"):
        model.encode_text(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_text(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ValueError, match="hidden_size"):
        VisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="image_size"):
        VisionConfig(image_size=30, patch_size=16)


def test_dtype_by_name_or_auto_and_bad_dtypes_named(saved):
    model, path = saved
    by_name = CLIP.from_pretrained(path, dtype="bfloat16")
    by_dtype = CLIP.from_pretrained(path, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(by_name.state_dict().items(), by_dtype.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert by_dtype.logit_scale.dtype == torch.bfloat16
    assert CLIP.from_pretrained(path, dtype="auto").logit_scale.dtype in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="dtype: expected a floating dtype"):
        CLIP.from_pretrained(path, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype: expected a floating dtype"):
        CLIP.from_pretrained(path, dtype="bf16")
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        CLIP.from_pretrained(path, dtype=16)
