"""SmolVLM.save_pretrained writes what transformers' SmolVLMForConditionalGeneration loads with no
missing or unexpected key and the same logits (GQA decoder, tied and untied head, Idefics3
layout), a bit-exact vlmfast round trip (float32, bfloat16, sharded), the loaded checkpoint's
own config.json, and the processor files of another checkpoint; native_to_hf splits q/k/v by
head counts for every model."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Idefics3Config, Idefics3ForConditionalGeneration  # noqa: E402
from transformers import SmolVLMConfig as HFSmolVLMConfig  # noqa: E402
from transformers import SmolVLMForConditionalGeneration  # noqa: E402

from tests.models.smolvlm_checkpoint import hf_processor, write_checkpoint  # noqa: E402
from tests.models.smolvlm_helpers import build_batch, hf_config_dict, tiny_model  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402
from vlmfast.models import checkpoint  # noqa: E402
from vlmfast.models.smolvlm import SmolVLM  # noqa: E402
from vlmfast.models.smolvlm.model import fuse_gate_up, split_gate_up  # noqa: E402

transformers.logging.set_verbosity_error()

# a 2 x 2 split + global image, one unsplit image, a tile partly covered by a small image
ROWS = [(5, 3, 4, None), (1, 7, 2, None), (1, 2, 9, (17, 24))]


def _tied_model():
    model = tiny_model(seed=3)
    model.config.tie_word_embeddings = True
    tied = SmolVLM(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    tied.load_state_dict(state, strict=True)
    return tied.eval()


def _loaded_idefics3(tmp_path):
    torch.manual_seed(5)
    hf = Idefics3ForConditionalGeneration(Idefics3Config(**hf_config_dict())).eval()
    hf.save_pretrained(tmp_path / "idefics3-source")
    return SmolVLM.from_pretrained(tmp_path / "idefics3-source")


MODELS = {
    "built-gqa-untied": lambda tmp_path: tiny_model(seed=1),
    "built-gqa-tied": lambda tmp_path: _tied_model(),
    "loaded-idefics3": _loaded_idefics3,
}
HF_CLASSES = {"smolvlm": SmolVLMForConditionalGeneration, "idefics3": Idefics3ForConditionalGeneration}


def _load_in_transformers(model, path, **kwargs):
    hf_cls = HF_CLASSES[model.config.model_type]
    hf, info = hf_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_loads_the_save_with_the_same_logits(name, tmp_path):
    model = MODELS[name](tmp_path)
    model.save_pretrained(tmp_path / "out")
    saved = checkpoint.read_weights(tmp_path / "out")
    assert ("lm_head.weight" in saved) == (not model.config.tied)  # a tied head is the embeddings
    hf = _load_in_transformers(model, tmp_path / "out")
    hf_state = hf.state_dict()
    for key, value in saved.items():  # every tensor where transformers expects it, bit for bit
        assert torch.equal(hf_state[key], value), key
    text = model.config.text_config
    q = hf_state["model.text_model.layers.0.self_attn.q_proj.weight"]
    k = hf_state["model.text_model.layers.0.self_attn.k_proj.weight"]
    assert q.shape[0] == text.num_attention_heads * text.head_dim
    assert k.shape[0] == text.num_key_value_heads * text.head_dim < q.shape[0]  # GQA: not thirds

    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=2)
    with torch.no_grad():
        expected = hf.double()(input_ids=ids, attention_mask=mask, pixel_values=pixels.double(),
                               pixel_attention_mask=pixel_mask).logits
        actual = model(ids, pixels, pixel_mask, mask)
    real = mask.bool()
    assert_close(actual[real], expected[real], name="logits")


def test_round_trip_is_bit_exact_and_keeps_the_config(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path / "a")
    again = SmolVLM.from_pretrained(tmp_path / "a")
    assert again.config == model.config
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    again.save_pretrained(tmp_path / "b")  # a loaded model writes its checkpoint's files back
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    a, b = checkpoint.read_weights(tmp_path / "a"), checkpoint.read_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_fields_survive_and_changes_are_written(tmp_path):
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(HFSmolVLMConfig(**hf_config_dict())).eval()
    hf.save_pretrained(tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    raw["a_field_vlmfast_does_not_read"] = {"kept": True}
    raw["text_config"]["eos_token_id"] = [2, 5]  # lists stay lists
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    model = SmolVLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "same")
    written = json.loads((tmp_path / "same" / "config.json").read_text())
    assert written == {**raw, "dtype": "float32"}

    model.config.text_config.rope_theta = 5000.0  # a changed value is written, the rest kept
    model.save_pretrained(tmp_path / "changed")
    written = json.loads((tmp_path / "changed" / "config.json").read_text())
    assert written["a_field_vlmfast_does_not_read"] == {"kept": True}
    assert written["text_config"]["rope_parameters"]["rope_theta"] == 5000.0
    assert written["text_config"]["eos_token_id"] == 2 and written["architectures"] == raw["architectures"]
    assert HFSmolVLMConfig.from_pretrained(tmp_path / "changed").text_config.rope_parameters["rope_theta"] == 5000.0


def test_sharded_save_loads_in_both_and_replaces_older_files(tmp_path):
    model = tiny_model(seed=6)
    out = tmp_path / "out"
    model.save_pretrained(out)
    model.save_pretrained(out, max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / checkpoint.INDEX_NAME).read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / checkpoint.WEIGHTS_NAME).exists()
    again = SmolVLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    hf = _load_in_transformers(model, out)
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    model.save_pretrained(out, max_shard_bytes=150_000)  # fewer shards: the old ones go
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == sorted(
        set(json.loads((out / checkpoint.INDEX_NAME).read_text())["weight_map"].values()))
    model.save_pretrained(out)  # unsharded again: no index, no shard left
    assert not (out / checkpoint.INDEX_NAME).exists() and not list(out.glob("model-*.safetensors"))


def test_bfloat16_save(tmp_path):
    model = tiny_model(seed=7, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again = SmolVLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    hf = _load_in_transformers(model, tmp_path, dtype="auto")
    assert hf.dtype == torch.bfloat16
    fused = fuse_gate_up(checkpoint.hf_to_native(hf.state_dict()))
    for key, value in model.state_dict().items():
        assert torch.equal(fused[key], value), key


def test_processor_from_makes_a_complete_checkpoint(tmp_path):
    source = write_checkpoint(tmp_path / "src")
    model = SmolVLM.from_pretrained(source)
    out = tmp_path / "out"
    model.save_pretrained(out, processor_from=source)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name

    import vlmfast
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 90))
    texts_source = vlmfast.pipeline("image-text-to-text", model=source, max_new_tokens=4)([[image]], ["Describe."])
    texts_out = vlmfast.pipeline("image-text-to-text", model=out, max_new_tokens=4)([[image]], ["Describe."])
    assert texts_out == texts_source
    hf_inputs = hf_processor(out)(text="User:<image>Hi", images=[[image]], return_tensors="pt")
    assert hf_inputs["input_ids"].shape[1] > 3

    bare = tmp_path / "bare"  # no processor files: the loaded generation defaults are still written
    model.save_pretrained(bare)
    assert json.loads((bare / "generation_config.json").read_text()) == model.generation_defaults


def test_bad_save_arguments(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="processor_from: expected a checkpoint directory"):
        model.save_pretrained(tmp_path / "out", processor_from=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with pytest.raises(ValueError, match="max_shard_bytes: expected None or a positive int, got 0"):
        model.save_pretrained(tmp_path / "out", max_shard_bytes=0)
    assert not (tmp_path / "out").exists()
    state = {"layers.0.self_attn.qkv.weight": torch.zeros(10, 4)}
    with pytest.raises(ValueError, match="no layers.0.self_attn.o_proj.weight"):
        checkpoint.native_to_hf(state)
    state["layers.0.self_attn.o_proj.weight"] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"expected H\*E \+ 2\*Hkv\*E rows with H\*E = 5"):
        checkpoint.native_to_hf(state)


def test_native_to_hf_splits_by_head_counts():
    """GQA rows [H*E | Hkv*E | Hkv*E] (not thirds); the inverse of hf_to_native and fuse_gate_up."""
    model = tiny_model(seed=8)
    native = model.state_dict()
    hf = split_gate_up(checkpoint.native_to_hf(native))
    prefix = "model.text_model.layers.1."
    assert hf[prefix + "self_attn.q_proj.weight"].shape == (48, 48)
    assert hf[prefix + "self_attn.k_proj.weight"].shape == hf[prefix + "self_attn.v_proj.weight"].shape == (24, 48)
    assert hf[prefix + "mlp.gate_proj.weight"].shape == hf[prefix + "mlp.up_proj.weight"].shape == (80, 48)
    fused_qkv = native[prefix + "self_attn.qkv.weight"]
    assert torch.equal(hf[prefix + "self_attn.k_proj.weight"], fused_qkv[48:72])
    back = fuse_gate_up(checkpoint.hf_to_native(hf))
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
