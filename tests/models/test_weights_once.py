"""The generative families hold their weights once in inference: every method that runs their GEMMs
(the towers' feature methods, forward, prefill, decode steps, generate) does so under the model's
cache_packed_weights (False by default), so ops.linear keeps no packed second copy of a weight
however often it is called; set to True, the copies are kept (models/weights_once.py)."""

import pytest
import torch

import vlmfast.ops.linear  # noqa: F401 - the module itself below, not the function vlmfast.ops exports
from vlmfast.models import from_pretrained

LINEAR = __import__("sys").modules["vlmfast.ops.linear"]


def _record_caching(model) -> list:
    """What ops.linear would do in every submodule call: keep copies (True) or not (the model's own
    call is left out: its hook runs before forward does)."""
    seen = []
    for module in model.modules():
        if module is model:
            continue
        module.register_forward_pre_hook(lambda *_: seen.append(LINEAR._CACHING.get()))
    return seen


def _llava(tmp_path):
    from tests.models.llava.checkpoint import write_checkpoint
    from tests.models.llava.test_llava import ROWS, batch

    model = from_pretrained(write_checkpoint(tmp_path))
    ids, mask, pixels = batch(model, ROWS)
    calls = {"image_features": lambda: model.image_features(pixels),
             "forward": lambda: model(ids, pixels, mask),
             "generate": lambda: model.generate(ids, pixels, mask, max_new_tokens=3)}
    return model, calls


def _blip2(tmp_path):
    from tests.models.blip2.checkpoint import write_checkpoint
    from tests.models.blip2.test_blip2 import LENGTHS, batch

    model = from_pretrained(write_checkpoint(tmp_path))
    ids, mask, pixels = batch(model, LENGTHS)
    calls = {"get_image_features": lambda: model.get_image_features(pixels),
             "get_qformer_features": lambda: model.get_qformer_features(pixels),
             "image_features": lambda: model.image_features(pixels),
             "forward": lambda: model(ids, pixels, mask),
             "generate": lambda: model.generate(ids, pixels, mask, max_new_tokens=3)}
    return model, calls


def _smolvlm(tmp_path):
    from tests.models.smolvlm_helpers import build_batch, tiny_model

    model = tiny_model()
    ids, mask, pixels, pixel_mask = build_batch([(1, 2, 3, None), (0, 4, 2, None)])
    calls = {"image_features": lambda: model.image_features(pixels, pixel_mask),
             "forward": lambda: model(ids, pixels, pixel_mask, mask),
             "generate": lambda: model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=3)}
    return model, calls


def _qwen2vl(tmp_path):
    from tests.models.qwen2vl.helpers import write_checkpoint

    model = from_pretrained(write_checkpoint(tmp_path))
    grid = [[1, 4, 4]]
    pixels = torch.randn(16, model.config.vision_config.patch_dim)
    return model, {"image_features": lambda: model.image_features(pixels, grid)}


@pytest.mark.parametrize("family", ["llava", "blip2", "smolvlm", "qwen2vl"])
def test_inference_keeps_no_packed_copy_unless_asked(family, tmp_path):
    model, calls = globals()[f"_{family}"](tmp_path)
    seen = _record_caching(model)
    with torch.inference_mode():
        for name, call in calls.items():
            seen.clear()
            call()
            assert seen and not any(seen), f"{name}: ran with packed copies kept"
        model.cache_packed_weights = True
        for name, call in calls.items():
            seen.clear()
            call()
            assert seen and all(seen), f"{name}: cache_packed_weights=True not honoured"
