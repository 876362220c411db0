"""vlmfast's Blip2 against transformers' Blip2ForConditionalGeneration (OPT decoder) on tiny random
checkpoints, pre-norm (tied head, cross-attention every 2nd Q-Former layer) and post-norm (untied,
every layer): logits, greedy tokens of padded batches and of the captioning prompt, the loss and
every gradient, the Q-Former and vision features, bf16 (Q-Former kept in float32), a saved
checkpoint read back by transformers, and the input checks."""

import pytest
import torch

from tests.models.blip2.checkpoint import LAYOUTS, write_checkpoint
from tests.tolerance import max_error
from vlmfast.models import checkpoint as ckpt
from vlmfast.models.blip2 import Blip2


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request, tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration

    path = write_checkpoint(tmp_path_factory.mktemp("blip2"), layout=request.param, seed=2)
    return Blip2ForConditionalGeneration.from_pretrained(path).eval(), Blip2.from_pretrained(path), path


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The pre-norm layout alone, for what the decoder's layout does not change."""
    from transformers import Blip2ForConditionalGeneration

    path = write_checkpoint(tmp_path_factory.mktemp("blip2-one"), layout="pre-norm-tied", seed=2)
    return Blip2ForConditionalGeneration.from_pretrained(path).eval(), Blip2.from_pretrained(path), path


def batch(model, lengths, seed=0, images=True):
    """Rows as transformers 5's Blip2Processor lays them out: the image tokens, then left padding,
    then BOS and the text (lengths: text tokens per row)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    Q, L = cfg.num_query_tokens, max(lengths) + 1
    pad, bos, vocab = cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.vocab_size
    ids = torch.full((len(lengths), L), pad)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, L - n - 1] = bos
        ids[b, L - n:] = torch.randint(5, vocab, (n,), generator=g)
        mask[b, L - n - 1:] = 1
    if images:
        ids = torch.cat([torch.full((len(lengths), Q), cfg.image_token_id), ids], dim=1)
        mask = torch.cat([torch.ones(len(lengths), Q, dtype=mask.dtype), mask], dim=1)
    side = cfg.vision_config.image_size
    return ids, mask, torch.randn(len(lengths), 3, side, side, generator=g)


LENGTHS = [7, 4, 1]


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    ids, mask, pixels = batch(model, LENGTHS)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        actual = model(ids, pixels, mask)
        unmasked = model(ids[:1, :], pixels[:1])  # no padding: no mask
        reference = hf(input_ids=ids[:1], pixel_values=pixels[:1]).logits
    valid = mask.bool()
    scale = expected.abs().max().item()
    assert scale > 1.0
    assert (actual - expected)[valid].abs().max().item() <= 1e-5 * scale
    assert (unmasked - reference).abs().max().item() <= 1e-5 * scale


def test_greedy_generation_matches_transformers(pair):
    hf, model, _ = pair
    ids, mask, pixels = batch(model, LENGTHS, seed=1)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                               do_sample=False, eos_token_id=None)
        captions = hf.generate(pixel_values=pixels, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(ids, pixels, mask, max_new_tokens=8, eos_token_id=-1), expected)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5, eos_token_id=-1), captions)


def test_loss_and_gradients_match_transformers(pair):
    hf, model, _ = pair
    ids, mask, pixels = batch(model, LENGTHS, seed=3)
    labels = ids.masked_fill(torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0, -100)
    labels[ids == model.config.image_token_id] = -100
    # transformers in eval mode: its train mode would add the Q-Former's and OPT's dropout
    expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
    expected.backward()
    model.zero_grad()
    actual = model.loss(ids, labels, pixels, mask)
    actual.backward()
    assert abs(actual.item() - expected.item()) <= 1e-5 * abs(expected.item())
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    state = {n: p.grad for n, p in model.named_parameters()}
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    ours = {**vision, **ckpt.native_to_hf({k: v for k, v in state.items() if k not in vision})}
    assert set(ours) == set(hf_grads)
    for name, grad in ours.items():
        reference = hf_grads[name]
        scale = max(reference.abs().max().item(), 1e-3)
        assert (grad - reference).abs().max().item() <= 2e-5 * scale, name
    hf.zero_grad()


def test_image_and_qformer_features_match_transformers(one):
    hf, model, _ = one
    _, _, pixels = batch(model, [2, 2], seed=4)
    with torch.no_grad():
        out = hf.get_image_features(pixels)
        vision, queries = model.get_image_features(pixels), model.get_qformer_features(pixels)
    assert max_error(vision, out.vision_outputs.last_hidden_state) <= 1e-5 * vision.abs().max().item()
    assert max_error(queries, out.qformer_outputs.last_hidden_state) <= 1e-5 * queries.abs().max().item()
    assert queries.shape == (2, model.config.num_query_tokens, model.config.qformer_config.hidden_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_qformer_dtype_and_logits_as_transformers(one, dtype):
    """transformers keeps the Q-Former and the queries in float32 in a float16 model only
    (_keep_in_fp32_modules); a bfloat16 model is bfloat16 throughout. Same dtypes here, the kept
    float32 parts read from the checkpoint as they are (bit-equal to the float32 model's)."""
    from transformers import Blip2ForConditionalGeneration

    hf, model, path = one
    ids, mask, pixels = batch(model, LENGTHS, seed=5)
    ours = Blip2.from_pretrained(path, dtype=dtype)
    theirs = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    kept = torch.float32 if dtype == torch.float16 else dtype
    assert theirs.qformer.layernorm.weight.dtype == theirs.query_tokens.dtype == kept  # the rule, as installed
    assert ours.qformer.layernorm.weight.dtype == ours.query_tokens.dtype == kept
    assert ours.language_projection.weight.dtype == dtype
    for (name, ours_p), (_, theirs_p) in zip(ours.qformer.named_parameters(), theirs.qformer.named_parameters()):
        assert ours_p.dtype == theirs_p.dtype and torch.equal(ours_p, theirs_p), name
    assert torch.equal(ours.query_tokens, theirs.query_tokens)
    valid = mask.bool()
    with torch.no_grad():
        exact = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[valid]
        low = theirs(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=mask).logits[valid]
        actual = ours(ids, pixels, mask)[valid]
    # the tolerance rule: at most twice transformers' own low-precision error against float32
    assert max_error(actual, exact) <= 2 * max_error(low, exact) + 1e-2


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    hf, model, source = pair
    model.save_pretrained(tmp_path / "out", processor_from=source, max_shard_bytes=60_000)
    assert (tmp_path / "out" / ckpt.INDEX_NAME).is_file()
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask, pixels = batch(model, LENGTHS, seed=6)
    valid = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        again = reloaded(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        ours = Blip2.from_pretrained(tmp_path / "out")(ids, pixels, mask)
    assert torch.equal(again[valid], expected[valid])
    mine = model(ids, pixels, mask)[valid]
    # ops.linear picks its GEMM per shape class by timing: equal up to float32 summation order
    assert (ours[valid] - mine).abs().max().item() <= 1e-5 * mine.abs().max().item()


def test_text_only_and_bad_inputs(one):
    hf, model, _ = one
    ids, mask, pixels = batch(model, [3, 5], images=False)
    with torch.no_grad():
        expected = hf.language_model(input_ids=ids, attention_mask=mask).logits
        actual = model(ids, None, mask)
    assert (actual - expected)[mask.bool()].abs().max().item() <= 1e-5 * expected.abs().max().item()
    with pytest.raises(ValueError, match="input_ids: expected .* image tokens"):
        model(ids, pixels, mask)
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixels[:, :, :8], mask)
    with pytest.raises(ValueError, match="input_ids: required"):
        model.generate(None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_linear_equals_torch(dtype):
    from vlmfast.models.causal_vlm import few_rows_linear, gemv_applies

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(72, 131).to(dtype)
    x = torch.randn(3, 1, 72, generator=g).to(dtype)
    with torch.no_grad():
        if not gemv_applies(x, layer.weight):
            pytest.skip("no GEMV kernel for this dtype on this CPU")
        actual = few_rows_linear(x, layer, layer.weight, layer.bias)
        expected = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        low = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert actual.shape == (3, 1, 131) and actual.dtype == dtype
    assert max_error(actual, expected) <= 2 * max_error(low, expected) + 1e-5
    assert not gemv_applies(torch.randn(16, 72).to(dtype), layer.weight)  # a prompt: a GEMM
