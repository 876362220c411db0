"""Qwen2-VL checkpoints: both key layouts and both config layouts load, save_pretrained writes
what transformers loads (sharded too), vlmfast.models.from_pretrained picks the family; bad
input raises ValueError / TypeError naming the argument before anything runs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tests.models.qwen2vl.helpers import build_batch, hf_model  # noqa: E402
from vlmfast.models import from_pretrained  # noqa: E402
from vlmfast.models.qwen2vl import Qwen2VL, Qwen2VLConfig  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_model("qwen2_5_vl", seed=1)
    path = tmp_path_factory.mktemp("qwen25")
    hf.save_pretrained(path)
    return hf, Qwen2VL.from_pretrained(path), path


def _logits(model, batch):
    ids, mask, pixels, grid, _ = batch
    with torch.no_grad():
        return model(ids, pixels, grid, mask)


def test_auto_from_pretrained_picks_the_family(tiny):
    _, ours, path = tiny
    model = from_pretrained(path)
    assert type(model) is Qwen2VL and model.config.version == "qwen2_5_vl"
    with pytest.raises(ValueError, match="model_type"):
        from vlmfast.models.auto import model_class

        model_class("not_a_model")


def test_transformers_module_layout_and_flat_config_load(tiny, tmp_path):
    """Keys as transformers' module tree names them (model.visual.*, model.language_model.*) and
    the older flat config.json (decoder fields at the top level, rope_scaling mrope) load to the
    same model."""
    hf, ours, path = tiny
    state = load_file(path / "model.safetensors")
    renamed = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        renamed[key] = value
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **text, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["model_type"] = "qwen2_5_vl"
    (tmp_path / "config.json").write_text(json.dumps(flat))
    other = Qwen2VL.from_pretrained(tmp_path)
    assert other.config == ours.config
    batch = build_batch(hf.config, [[(1, 4, 6)], []], seed=2)
    torch.testing.assert_close(_logits(other, batch), _logits(ours, batch), rtol=0, atol=0)


@pytest.mark.parametrize("shard", [None, 40_000])
def test_save_pretrained_loads_in_transformers(tiny, tmp_path, shard):
    hf, ours, _ = tiny
    ours.save_pretrained(tmp_path, max_shard_bytes=shard)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()
    again = type(hf).from_pretrained(tmp_path).eval()
    ids, mask, pixels, grid, types = batch = build_batch(hf.config, [[(1, 8, 8)], [(1, 4, 6)]], seed=3)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=types).logits
        reloaded = again(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                         mm_token_type_ids=types).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(Qwen2VL.from_pretrained(tmp_path), batch), _logits(ours, batch),
                               rtol=0, atol=0)
    assert Qwen2VLConfig.from_hf(json.loads((tmp_path / "config.json").read_text())) == ours.config


def test_tied_head_qwen2_vl(tmp_path):
    hf = hf_model("qwen2_vl", seed=2, tied=True)
    hf.save_pretrained(tmp_path)
    ours = Qwen2VL.from_pretrained(tmp_path)
    assert ours.lm_head is None and ours.head_weight is ours.model.language_model.embed_tokens.weight
    ids, mask, pixels, grid, types = build_batch(hf.config, [[(1, 4, 4)], []], seed=4)
    with torch.no_grad():
        expected = hf.double()(input_ids=ids, attention_mask=mask, pixel_values=pixels.double(),
                               image_grid_thw=grid, mm_token_type_ids=types).logits
    valid = mask.bool()
    torch.testing.assert_close(_logits(ours, (ids, mask, pixels, grid, types))[valid].double(), expected[valid],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input

def test_bad_vision_inputs_name_the_argument(tiny):
    hf, ours, _ = tiny
    ids, mask, pixels, grid, _ = build_batch(hf.config, [[(1, 4, 6)], [(1, 8, 8)]], seed=5)
    cases = [
        (dict(pixel_values=pixels), "image_grid_thw: required"),
        (dict(image_grid_thw=grid), "pixel_values: required"),
        (dict(pixel_values=pixels[:-4], image_grid_thw=grid), "image_grid_thw: .* hold 88 patches, but pixel_values "
                                                               "has 84 rows"),
        (dict(pixel_values=pixels[:, :-1], image_grid_thw=grid), r"pixel_values: expected flattened patches"),
        (dict(pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 7]])), "image_grid_thw: row 1"),
        (dict(pixel_values=pixels, image_grid_thw=grid[:, :2]), r"image_grid_thw: expected int \(n, 3\)"),
        (dict(pixel_values=pixels, image_grid_thw=grid.float()), "image_grid_thw"),
        (dict(pixel_values=torch.cat([pixels, pixels[:16]]), image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 8],
                                                                                           [1, 4, 4]])),
         "input_ids: expected 26 image tokens"),
        (dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=ids[:, 1:]), "mm_token_type_ids"),
        (dict(pixel_values=pixels, image_grid_thw=grid, second_per_grid_ts=[1.0]), "second_per_grid_ts"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            ours(ids, attention_mask=mask, **kwargs)
    with pytest.raises(ValueError, match="input_ids: .* image tokens .* but no pixel_values"):
        ours(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, pixels, grid, mask[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        ours.loss(ids, ids[:, 1:], pixels, grid, mask)
    with pytest.raises(ValueError, match="image_grid_thw: required"):
        ours.generate(ids, pixels, attention_mask=mask)


def test_image_tokens_split_differently_from_the_grids(tiny):
    """The right total of image tokens, but runs that do not match the images one by one."""
    hf, ours, _ = tiny
    ids, mask, pixels, grid, _ = build_batch(hf.config, [[(1, 4, 6)], [(1, 8, 8)]], seed=6)
    swapped = torch.tensor([[1, 8, 8], [1, 4, 6]])
    with pytest.raises(ValueError, match="input_ids: row 0 has a run of 6 image tokens .* needs"):
        ours(ids, pixels, swapped, mask)


def test_config_errors_name_the_field():
    good = {"model_type": "qwen2_vl", "vision_config": {"embed_dim": 32, "hidden_size": 64, "num_heads": 2},
            "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2]}}}
    assert Qwen2VLConfig.from_hf(good).text_config.head_dim == 16
    bad = json.loads(json.dumps(good))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig.from_hf(bad)
    with pytest.raises(ValueError, match="model_type"):
        Qwen2VLConfig.from_hf({**good, "model_type": "qwen3_vl"})
    bad = json.loads(json.dumps(good))
    bad["vision_config"]["hidden_size"] = 48
    with pytest.raises(ValueError, match="text_config.hidden_size"):
        Qwen2VLConfig.from_hf(bad)
