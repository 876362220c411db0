"""CLIP and SigLIP loaded from random-weight transformers checkpoints give transformers' embeddings
and logits: ours in float32 against transformers run in float64 (the DESIGN.md rule, 1e-5 relative)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig as HFCLIPConfig  # noqa: E402
from transformers import CLIPModel, SiglipModel  # noqa: E402
from transformers import SiglipConfig as HFSiglipConfig  # noqa: E402

from tests.tolerance import assert_close  # noqa: E402
from vlmfast.models import CLIP, SigLIP  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 101


def _tower(hidden, heads, layers, act, **extra):
    return dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                intermediate_size=2 * hidden + 8, hidden_act=act, **extra)


# (patch, image size, vision (hidden, heads, layers), text (hidden, heads, layers), act, eos id)
CLIP_CASES = {
    "p14-img28-quickgelu": (14, 28, (40, 1, 1), (32, 2, 1), "quick_gelu", VOCAB - 1),
    "p16-img48-gelu-3layers": (16, 48, (48, 3, 3), (64, 4, 2), "gelu", VOCAB - 1),
    "p32-img64-legacy-eos2": (32, 64, (64, 2, 2), (48, 3, 3), "quick_gelu", 2),
}
SIGLIP_CASES = {
    "p16-img32-tanh": (16, 32, (32, 2, 1), (40, 1, 1), "gelu_pytorch_tanh", True),
    "p14-img42-gelu-3layers": (14, 42, (48, 3, 3), (32, 2, 2), "gelu", True),
    "p16-img48-nohead": (16, 48, (64, 4, 2), (48, 3, 1), "gelu_pytorch_tanh", False),
}


def _ids(batch, length, eos, pad=0):
    """Random ids in [3, VOCAB-1) with an end token; rows padded after it, one row full length."""
    ids = torch.randint(3, VOCAB - 1, (batch, length))
    lengths = torch.tensor([length] + [max(2, length - 2 - i) for i in range(batch - 1)])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = eos if eos != 2 else VOCAB - 1  # legacy pooling takes the max id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return ids, mask


@pytest.fixture(scope="module", params=list(CLIP_CASES), ids=list(CLIP_CASES))
def clip_pair(request, tmp_path_factory):
    patch, size, v, t, act, eos = CLIP_CASES[request.param]
    torch.manual_seed(0)
    cfg = HFCLIPConfig(
        vision_config=_tower(*v, act, image_size=size, patch_size=patch),
        text_config=_tower(*t, act, vocab_size=VOCAB, max_position_embeddings=12, eos_token_id=eos,
                           bos_token_id=1, pad_token_id=0),
        projection_dim=24,
    )
    hf = CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip") / request.param
    hf.save_pretrained(path)
    return hf.double(), CLIP.from_pretrained(path), size, eos, path


@pytest.fixture(scope="module", params=list(SIGLIP_CASES), ids=list(SIGLIP_CASES))
def siglip_pair(request, tmp_path_factory):
    patch, size, v, t, act, use_head = SIGLIP_CASES[request.param]
    torch.manual_seed(1)
    cfg = HFSiglipConfig(
        vision_config=_tower(*v, act, image_size=size, patch_size=patch, vision_use_head=use_head),
        text_config=_tower(*t, act, vocab_size=VOCAB, max_position_embeddings=10, projection_size=v[0],
                           eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0),
    )
    hf = SiglipModel(cfg).eval()
    with torch.no_grad():  # a non-zero bias, so a model that dropped it would fail
        hf.logit_bias.fill_(-2.5)
    path = tmp_path_factory.mktemp("siglip") / request.param
    hf.save_pretrained(path)
    return hf.double(), SigLIP.from_pretrained(path), size, path


@torch.no_grad()
def test_clip_matches_transformers(clip_pair):
    hf, ours, size, eos, _ = clip_pair
    pixels = torch.randn(3, 3, size, size)
    ids, mask = _ids(3, 11, eos)
    assert_close(ours.encode_image(pixels), hf.get_image_features(pixels.double()).pooler_output, name="image")
    for m in (mask, None):
        expected = hf.get_text_features(ids, attention_mask=m).pooler_output
        assert_close(ours.encode_text(ids, m), expected, name="text")
    out = hf(pixel_values=pixels.double(), input_ids=ids, attention_mask=mask)
    per_image, per_text = ours(pixels, ids, mask)
    assert_close(per_image, out.logits_per_image, name="logits_per_image")
    assert_close(per_text, out.logits_per_text, name="logits_per_text")
    assert ours.logit_scale.shape == hf.logit_scale.shape


@torch.no_grad()
def test_siglip_matches_transformers(siglip_pair):
    hf, ours, size, _ = siglip_pair
    pixels = torch.randn(2, 3, size, size)
    ids = torch.randint(3, VOCAB, (3, 10))  # SigLIP pads to max length and pools the last position
    if hf.config.vision_config.vision_use_head:
        assert_close(ours.encode_image(pixels), hf.get_image_features(pixels.double()).pooler_output, name="image")
        out = hf(pixel_values=pixels.double(), input_ids=ids)
        per_image, per_text = ours(pixels, ids)
        assert_close(per_image, out.logits_per_image, name="logits_per_image")
        assert_close(per_text, out.logits_per_text, name="logits_per_text")
    else:
        tokens = hf.vision_model(pixels.double()).last_hidden_state
        assert_close(ours.vision_model.forward_tokens(pixels), tokens, name="tokens")
    assert_close(ours.encode_text(ids), hf.get_text_features(ids).pooler_output, name="text")
    assert ours.logit_bias.item() == -2.5


@torch.no_grad()
def test_clip_uint8_images_with_mean_std_equal_normalised_floats(clip_pair):
    _, ours, size, _, _ = clip_pair
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])
    floats = (images.permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert_close(ours.encode_image(images, mean=mean, std=std), ours.encode_image(floats).double(), name="uint8")


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(clip_pair, siglip_pair, tmp_path):
    for (hf, ours, size, *_), hf_cls in ((clip_pair, CLIPModel), (siglip_pair, SiglipModel)):
        ours.save_pretrained(tmp_path / hf_cls.__name__)
        back = hf_cls.from_pretrained(tmp_path / hf_cls.__name__).eval()
        theirs = back.state_dict()
        for key, value in hf.state_dict().items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(theirs[key].double(), value), key
        pixels = torch.randn(2, 3, size, size)
        # Against the reloaded model run in float64 (the DESIGN.md rule): two float32 GEMMs that
        # sum in different orders differ by more than allclose's rtol=1e-5, atol=1e-6 allows.
        theirs_out = back.double().get_image_features(pixels.double()).pooler_output
        if theirs_out is not None:  # None: a SigLIP without head has no pooled output in transformers
            assert_close(ours.encode_image(pixels), theirs_out, name="reloaded image features")


@torch.no_grad()
def test_sharded_checkpoints_load_both_ways(clip_pair, tmp_path):
    hf, ours, size, _, _ = clip_pair
    hf.float().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    hf.double()
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    loaded = CLIP.from_pretrained(tmp_path / "hf")
    pixels = torch.randn(2, 3, size, size)
    assert torch.equal(loaded.encode_image(pixels), ours.encode_image(pixels))
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=20_000)
    shards = list((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "ours" / "model.safetensors").exists()
    again = CLIP.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.encode_image(pixels), ours.encode_image(pixels))
    back = CLIPModel.from_pretrained(tmp_path / "ours")
    assert torch.allclose(back.get_image_features(pixels).pooler_output, ours.encode_image(pixels), atol=1e-5)


@torch.no_grad()
def test_bfloat16_load_runs_in_bfloat16(clip_pair):
    _, ours, size, _, path = clip_pair
    low = CLIP.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    pixels = torch.randn(2, 3, size, size)
    out = low.encode_image(pixels.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = ours.encode_image(pixels)
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
