"""Every family's from_pretrained casts each tensor while reading it (models/weights_io.py): what
the reader hands back for a bf16 (float16) load of a float32 checkpoint is already in that
dtype, except the parts a family keeps in float32 (BLIP-2's Q-Former and queries in a float16
model), so no float32 copy of the whole checkpoint is ever held; the loaded model equals casting
the float32 one."""

import pytest
import torch

from vlmfast.models import from_pretrained, weights_io


def _llava(path):
    from tests.models.llava.checkpoint import write_checkpoint

    return write_checkpoint(path)


def _blip2(path):
    from tests.models.blip2.checkpoint import write_checkpoint

    return write_checkpoint(path)


def _smolvlm(path):
    from tests.models.smolvlm_checkpoint import write_checkpoint

    return write_checkpoint(path)


def _qwen2vl(path):
    from tests.models.qwen2vl.helpers import write_checkpoint

    return write_checkpoint(path)


def _clip(path):
    from tests.models.test_checkpoint import tiny_clip

    tiny_clip().save_pretrained(path)
    return path


FLOAT32_PARTS = {("blip2", torch.float16): ("qformer.", "query_tokens")}  # transformers' rule


@pytest.mark.parametrize("family, dtype", [("llava", torch.bfloat16), ("blip2", torch.bfloat16),
                                           ("blip2", torch.float16), ("smolvlm", torch.bfloat16),
                                           ("qwen2vl", torch.bfloat16), ("clip", torch.bfloat16)])
def test_low_precision_load_of_a_float32_checkpoint_casts_as_it_reads(family, dtype, tmp_path, monkeypatch):
    path = globals()[f"_{family}"](tmp_path / family)
    read = []
    original = weights_io.read_weights

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        read.append(state)
        return state

    monkeypatch.setattr(weights_io, "read_weights", spy)
    model = from_pretrained(path, dtype=dtype)
    monkeypatch.undo()
    assert len(read) == 1, "from_pretrained reads the checkpoint through weights_io once"
    kept = FLOAT32_PARTS.get((family, dtype), ())
    floating = {k: v for k, v in read[0].items() if v.is_floating_point()}
    assert floating
    for key, tensor in floating.items():
        assert tensor.dtype == (torch.float32 if key.startswith(kept) else dtype), key
    exact = from_pretrained(path)
    for (name, ours), (_, reference) in zip(model.state_dict().items(), exact.state_dict().items()):
        expected = reference if name.startswith(kept) or not reference.is_floating_point() \
            else reference.to(dtype)
        assert ours.dtype == expected.dtype and torch.equal(ours, expected), name
