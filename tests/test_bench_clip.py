"""The CLIP benchmark suite runs in quick mode and compares equal models (smoke test: no timing
is asserted)."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from vlmfast.bench import clip  # noqa: E402
from vlmfast.bench.timing import Result  # noqa: E402


def test_quick_run_returns_both_cases():
    results = clip.run(torch.device("cpu"), torch.float32, quick=True)
    assert [r.case for r in results] == ["image embedding tiny b=4 float32", "train step tiny b=4 float32"]
    for r in results:
        assert isinstance(r, Result) and r.suite == "clip" and r.peer == "transformers"
        assert r.ms > 0 and r.peer_ms > 0 and math.isfinite(r.speedup)
    embed, train = results
    assert embed.extra["max_abs_diff"] < 1e-4  # the two models are the same model
    assert embed.extra["img_per_s"] == pytest.approx(4e3 / embed.ms)
    assert train.extra["pairs_per_s"] == pytest.approx(4e3 / train.ms)


def test_pair_has_the_same_weights_and_losses():
    hf, ours = clip.build_pair(clip.QUICK)
    pixels, ids = clip._inputs(clip.QUICK, 3, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(clip._ours_loss(ours, pixels, ids), clip._hf_loss(hf, pixels, ids),
                                   rtol=1e-5, atol=1e-5)
    # separate storage: training one does not move the other
    first = next(hf.parameters())
    assert all(p.data_ptr() != first.data_ptr() for p in ours.parameters())


@pytest.mark.parametrize("name", sorted(clip.MODELS))
def test_real_dimensions_build_on_meta(name):
    """The full configs are valid CLIP configs with the published parameter counts (no weights made)."""
    import transformers

    spec = clip.MODELS[name]
    with torch.device("meta"):
        model = transformers.CLIPModel(transformers.CLIPConfig(**spec))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx({"ViT-B/32": 151.3, "ViT-B/16": 149.6, "ViT-L/14": 427.6}[name], abs=0.5)
