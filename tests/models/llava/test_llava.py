"""vlmfast's Llava against transformers' LlavaForConditionalGeneration on tiny random checkpoints:
logits, greedy and sampled tokens of left-padded batches with several images, the loss and every
gradient, a vlmfast-saved checkpoint read back by transformers, and the input checks."""

import pytest
import torch

from tests.models.llava.checkpoint import write_checkpoint
from vlmfast.models import checkpoint as ckpt
from vlmfast.models.llava import Llava
from vlmfast.models.smolvlm.model import split_gate_up

LAYOUTS = {  # name: (vision_feature_select_strategy, vision_feature_layer, tied)
    "default-penultimate": ("default", -2, False),
    "full-two-layers-tied": ("full", [-3, 1], True),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    strategy, layer, tied = LAYOUTS[request.param]
    path = write_checkpoint(tmp_path_factory.mktemp("llava"), seed=3, strategy=strategy, feature_layer=layer, tied=tied)
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return hf, Llava.from_pretrained(path), path


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The default layout alone, for what the feature layers and the head's tying do not change."""
    from transformers import LlavaForConditionalGeneration

    path = write_checkpoint(tmp_path_factory.mktemp("llava-one"), seed=3)
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), Llava.from_pretrained(path), path


def batch(model, rows, seed=0):
    """rows: per row (images, text tokens before, after, left padding). Returns input_ids,
    attention_mask, pixel_values (one image per <image> run, in order)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    image, pad, vocab = cfg.image_token_id, cfg.text_config.pad_token_id, cfg.text_config.vocab_size
    ids = []
    for images, before, after, padding in rows:
        row = [pad] * padding + torch.randint(5, vocab, (before,), generator=g).tolist()
        for _ in range(images):
            row += [image] * cfg.image_seq_len + torch.randint(5, vocab, (2,), generator=g).tolist()
        ids.append(row + torch.randint(5, vocab, (after,), generator=g).tolist())
    L = max(len(r) for r in ids)
    input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in ids])
    mask = torch.ones_like(input_ids)
    for b, (_, _, _, padding) in enumerate(rows):
        mask[b, : L - len(ids[b]) + padding] = 0
    n = sum(r[0] for r in rows)
    side = cfg.vision_config.image_size
    pixels = torch.randn(n, 3, side, side, generator=g)
    return input_ids, mask, pixels


ROWS = [(1, 3, 4, 0), (2, 1, 2, 3), (0, 6, 5, 1)]


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    ids, mask, pixels = batch(model, ROWS)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        actual = model(ids, pixels, mask)
    valid = mask.bool()  # padding positions are not compared: nobody reads them
    scale = expected.abs().max().item()
    assert scale > 1.0
    assert (actual - expected)[valid].abs().max().item() <= 1e-5 * scale


def test_logits_without_padding_or_mask(pair):
    hf, model, _ = pair
    ids, _, pixels = batch(model, [(1, 2, 3, 0), (1, 4, 1, 0)], seed=1)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        actual = model(ids, pixels)
    assert (actual - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_greedy_generation_matches_transformers(pair):
    hf, model, _ = pair
    ids, mask, pixels = batch(model, ROWS, seed=2)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=10,
                               do_sample=False)
    actual = model.generate(ids, pixels, mask, max_new_tokens=10)
    assert torch.equal(actual, expected)


def test_sampled_tokens_and_streaming_match(one):
    hf, model, _ = one
    ids, mask, pixels = batch(model, ROWS[:2], seed=4)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6,
                               do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    streamed = []
    torch.manual_seed(11)
    actual = model.generate(ids, pixels, mask, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                            streamer=streamed.append)
    assert torch.equal(actual, expected)
    assert torch.equal(torch.stack(streamed, dim=1), actual[:, ids.shape[1]:])


def _hf_names(our_grads: dict, hf_names: set) -> dict:
    """Our parameter names (fused q/k/v and gate/up) -> transformers' in-memory names."""
    out = {}
    for key, value in split_gate_up(ckpt.native_to_hf(our_grads)).items():
        if key not in hf_names:
            key = key.replace("vision_tower.vision_model.", "vision_tower.")  # transformers 5 drops that level
        out[key] = value
    return out


@pytest.mark.parametrize("logits", ["materialised", "fused"])
def test_loss_and_gradients_match_transformers(pair, logits, monkeypatch):
    from vlmfast.models import token_head

    if logits == "fused":  # the fused linear + cross-entropy, as a batch with many labels takes
        monkeypatch.setattr(token_head, "MATERIALISED_LOGITS", 0)
    hf, model, _ = pair
    ids, mask, pixels = batch(model, ROWS, seed=5)
    # a label is predicted from the position before it: both must be real tokens (transformers'
    # logits at padding positions are garbage it would add to the loss)
    labels = ids.masked_fill(torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0, -100)
    labels[:, : ids.shape[1] // 2] = -100
    hf.train()
    try:
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
        expected.backward()
    finally:
        hf.eval()
    model.zero_grad()
    actual = model.loss(ids, labels, pixels, mask)
    actual.backward()
    assert abs(actual.item() - expected.item()) <= 1e-5 * abs(expected.item())
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    # the tower's layers after the feature layer and its post-layernorm get no gradient (zeros here)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    ours = _hf_names(grads, set(hf_grads))
    assert set(ours) == set(hf_grads) - ({"lm_head.weight"} if model.config.tied else set())
    for name, grad in ours.items():
        reference = hf_grads[name]
        if reference is None:
            assert not grad.any(), name
            continue
        scale = max(reference.abs().max().item(), 1e-3)
        assert (grad - reference).abs().max().item() <= 2e-5 * scale, name
    hf.zero_grad()


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    from transformers import LlavaForConditionalGeneration

    hf, model, source = pair
    model.save_pretrained(tmp_path / "out", processor_from=source, max_shard_bytes=40_000)
    assert (tmp_path / "out" / ckpt.INDEX_NAME).is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask, pixels = batch(model, ROWS, seed=6)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        again = reloaded(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        ours = Llava.from_pretrained(tmp_path / "out")(ids, pixels, mask)
    valid = mask.bool()
    assert torch.equal(again[valid], expected[valid])
    mine = model(ids, pixels, mask)[valid]
    # ops.linear picks its GEMM per shape class by timing: equal up to float32 summation order
    assert (ours[valid] - mine).abs().max().item() <= 1e-5 * mine.abs().max().item()


def test_uint8_pixels_equal_normalised_float(one):
    _, model, _ = one
    g = torch.Generator().manual_seed(7)
    side = model.config.vision_config.image_size
    raw = torch.randint(0, 256, (2, side, side, 3), dtype=torch.uint8, generator=g)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in model.image_normalization)
    normalised = (raw.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        a = model.image_features(raw)
        b = model.image_features(normalised)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_bad_inputs_name_the_argument(one):
    _, model, _ = one
    ids, mask, pixels = batch(model, [(1, 2, 2, 0)])
    with pytest.raises(ValueError, match="input_ids: expected .* image tokens"):
        model(ids[:, 3:], pixels)
    with pytest.raises(ValueError, match="input_ids: expected .* image tokens"):
        model(ids, torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixels[:, :, :16])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, pixels, mask[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, ids[:, 1:], pixels)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float(), pixels)
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        model.check_inputs(ids, pixels, torch.ones(1, 3, 32, 32))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_native_cpu_decode_gives_the_eager_tokens(one, rows):
    _, model, _ = one
    ids, mask, pixels = batch(model, ROWS[:rows], seed=8)
    model.native_decode = False
    eager = model.generate(ids, pixels, mask, max_new_tokens=8)
    model.native_decode = True
    cache = model.new_cache(rows, ids.shape[1] + 8)
    with torch.no_grad():
        native = model.decodes_natively(ids[:, -1], cache)
    if not native:
        pytest.skip("no native decode on this CPU (AVX-512 needed for float32)")
    assert torch.equal(model.generate(ids, pixels, mask, max_new_tokens=8), eager)


def test_bfloat16_logits_within_twice_transformers_error(one):
    from transformers import LlavaForConditionalGeneration

    from tests.tolerance import max_error

    hf, model, path = one
    ids, mask, pixels = batch(model, ROWS, seed=9)
    ours = Llava.from_pretrained(path, dtype=torch.bfloat16)
    theirs = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    valid = mask.bool()
    with torch.no_grad():
        exact = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[valid]
        low = theirs(input_ids=ids, pixel_values=pixels.bfloat16(), attention_mask=mask).logits[valid]
        actual = ours(ids, pixels.bfloat16(), mask)[valid]
    assert actual.dtype == torch.bfloat16
    assert max_error(actual, exact) <= 2 * max_error(low, exact) + 1e-2
