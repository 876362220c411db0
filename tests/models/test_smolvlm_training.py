"""SmolVLM training: gradient checkpointing of the vision encoder layers and the decoder layers
gives the same loss and the same gradient of every parameter as without (float32 and bf16
autocast, padded rows, a frozen vision tower), recomputes each layer once in the backward, and
stays off where no backward follows (no_grad, generation with a KV cache); the Trainer's
gradient_checkpointing option reaches both stacks."""

import copy

import pytest
import torch

from tests.models.smolvlm_helpers import IMAGE_TOKEN, build_batch, tiny_model
from vlmfast.models.layers import EncoderLayer, set_gradient_checkpointing
from vlmfast.models.smolvlm.decoder import DecoderLayer
from vlmfast.train import TrainConfig, Trainer

# (tiles, text before, text after, valid pixels of the last tile): a split image, a row with
# left padding, a partly covered tile (the vision tower's patch-mask path)
ROWS = [(5, 3, 4, None), (1, 2, 9, (17, 24)), (1, 7, 2, None)]
VISION_LAYERS, DECODER_LAYERS = 2, 2  # tiny_model's


def _batch(seed=0):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=seed)
    labels = torch.where(mask.bool() & (ids != IMAGE_TOKEN), ids, torch.full_like(ids, -100))
    return ids, labels, pixels, pixel_mask, mask


def _count_layer_calls(model) -> dict:
    """{"vision": n, "decoder": n} forwards so far. The instances' forward is wrapped (forward
    hooks do not fire during checkpoint's recomputation)."""
    calls = {"vision": 0, "decoder": 0}

    def counting(forward, kind):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return forward(*args, **kwargs)
        return wrapped

    for layer in model.modules():
        if isinstance(layer, (EncoderLayer, DecoderLayer)):
            kind = "vision" if isinstance(layer, EncoderLayer) else "decoder"
            layer.forward = counting(layer.forward, kind)
    return calls


def _loss_and_grads(model, batch, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want):
    loss, grads = got
    want_loss, want_grads = want
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        # the recomputed forward is the same arithmetic: equal up to summation order at most
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_same_loss_and_gradients_and_layers_recomputed():
    plain = tiny_model().train()
    checkpointed = copy.deepcopy(plain)
    assert checkpointed.set_gradient_checkpointing(True) is checkpointed
    batch = _batch()
    want = _loss_and_grads(plain, batch)

    calls = _count_layer_calls(checkpointed)
    checkpointed.zero_grad(set_to_none=True)
    loss = checkpointed.loss(*batch)
    forward_calls = dict(calls)
    loss.backward()
    # 7 tiles go through the vision tower in one batch: one call per layer
    assert forward_calls == {"vision": VISION_LAYERS, "decoder": DECODER_LAYERS}
    assert calls == {"vision": 2 * VISION_LAYERS, "decoder": 2 * DECODER_LAYERS}  # each recomputed once
    _assert_same((loss.detach(), {n: p.grad for n, p in checkpointed.named_parameters()}), want)


def test_same_under_bf16_autocast():
    """Non-reentrant checkpointing replays the forward under the autocast state it ran with."""
    plain = tiny_model(seed=1).train()
    checkpointed = copy.deepcopy(plain).set_gradient_checkpointing(True)
    batch = _batch(seed=2)
    _assert_same(_loss_and_grads(checkpointed, batch, autocast=True), _loss_and_grads(plain, batch, autocast=True))


def test_same_with_a_frozen_vision_tower():
    plain = tiny_model(seed=3).train()
    for p in plain.model.vision_model.parameters():
        p.requires_grad_(False)
    checkpointed = copy.deepcopy(plain).set_gradient_checkpointing(True)
    batch = _batch(seed=4)
    got = _loss_and_grads(checkpointed, batch)
    _assert_same(got, _loss_and_grads(plain, batch))
    assert all(p.grad is None for p in checkpointed.model.vision_model.parameters())


def test_no_recompute_without_grad_nor_in_generate():
    model = tiny_model(seed=5).set_gradient_checkpointing(True)
    reference = copy.deepcopy(model).set_gradient_checkpointing(False)
    calls = _count_layer_calls(model)
    ids, labels, pixels, pixel_mask, mask = _batch(seed=6)
    with torch.no_grad():
        logits = model(ids, pixels, pixel_mask, mask)
    assert calls == {"vision": VISION_LAYERS, "decoder": DECODER_LAYERS}
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids, pixels, pixel_mask, mask), rtol=0, atol=0)
    # generation writes a KV cache inside each layer: it must run the layers plainly even with
    # gradients on (a checkpointed layer would write the cache twice)
    generated = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=3, eos_token_id=[])
    expected = reference.generate(ids, pixels, pixel_mask, mask, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(generated, expected)


def test_off_again():
    model = tiny_model(seed=7).train().set_gradient_checkpointing(True)
    model.set_gradient_checkpointing(False)
    assert not model.model.text_model.gradient_checkpointing
    assert not model.model.vision_model.encoder.gradient_checkpointing
    calls = _count_layer_calls(model)
    model.loss(*_batch(seed=8)).backward()
    assert calls == {"vision": VISION_LAYERS, "decoder": DECODER_LAYERS}  # forward only


def test_set_gradient_checkpointing_finds_both_stacks():
    model = tiny_model(seed=9)
    assert set_gradient_checkpointing(model, True) is model
    assert model.model.text_model.gradient_checkpointing is True
    assert model.model.vision_model.encoder.gradient_checkpointing is True


def test_trainer_option_reaches_the_decoder_and_the_vision_tower():
    model = tiny_model(seed=10).train()
    batch = _batch(seed=11)

    def loss_fn(m, ids, labels, pixels, pixel_mask, mask):
        return m.loss(ids, labels, pixels, pixel_mask, mask)

    trainer = Trainer(model, TrainConfig(steps=1, lr=1e-3, gradient_checkpointing=True),
                      lambda step, micro: batch, loss_fn=loss_fn)
    assert model.model.text_model.gradient_checkpointing and model.model.vision_model.encoder.gradient_checkpointing
    calls = _count_layer_calls(model)
    losses = trainer.fit()
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    assert calls == {"vision": 2 * VISION_LAYERS, "decoder": 2 * DECODER_LAYERS}


def test_bad_model_names_the_argument():
    with pytest.raises(TypeError, match="model: expected a module holding an Encoder"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("logits", ["fused", "materialised"])
def test_bf16_autocast_head_runs_in_bf16_within_twice_transformers_error(tmp_path, monkeypatch, logits):
    """Under autocast the head + loss gets bf16 hidden states and weight (as transformers'
    lm_head does), through the fused op (many labelled rows) or one GEMM + torch's cross entropy
    (few: the default for this batch); the loss is within twice transformers' autocast error of
    the float64 loss."""
    transformers = pytest.importorskip("transformers")
    from tests.models.smolvlm_helpers import hf_config_dict
    from vlmfast.models import token_head
    from vlmfast.models.smolvlm import SmolVLM, _ops

    if logits == "fused":
        monkeypatch.setattr(token_head, "MATERIALISED_LOGITS", 0)

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**hf_config_dict())).train()
    hf.save_pretrained(tmp_path)
    ours = SmolVLM.from_pretrained(tmp_path).train()
    ids, labels, pixels, pixel_mask, mask = _batch(seed=12)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_attention_mask=pixel_mask, labels=labels)
    with torch.no_grad():
        exact = hf.double()(pixel_values=pixels.double(), **inputs).loss.item()
    hf.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_loss = hf(pixel_values=pixels, **inputs).loss.item()
        seen = []
        fused = _ops.linear_cross_entropy
        monkeypatch.setattr(_ops, "linear_cross_entropy",
                            lambda h, w, t, **kw: seen.append((h.dtype, w.dtype)) or fused(h, w, t, **kw))
        loss = ours.loss(ids, labels, pixels, pixel_mask, mask)
    assert seen == ([(torch.bfloat16, torch.bfloat16)] if logits == "fused" else [])
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact) <= max(2 * abs(hf_loss - exact), 1e-3 * abs(exact))
    loss.backward()
    head = ours.lm_head.weight.grad
    assert head.dtype == torch.float32 and torch.isfinite(head).all() and head.abs().sum() > 0


def test_bf16_autocast_reaches_the_vision_tower(monkeypatch):
    """vlmfast.ops.linear (the vision tower's projections) follows autocast like torch's linear:
    the tower's attention sees bf16 q, k, v, and the gradients land in the float32 weights."""
    from vlmfast.models import _ops as shared_ops

    model = tiny_model(seed=13).train()
    seen = []
    attention = shared_ops.attention
    monkeypatch.setattr(shared_ops, "attention", lambda q, k, v, **kw: seen.append(q.dtype) or attention(q, k, v, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(*_batch(seed=14))
    assert seen == [torch.bfloat16] * VISION_LAYERS
    loss.backward()
    fc1 = model.model.vision_model.encoder.layers[0].mlp.fc1.weight
    assert fc1.dtype == torch.float32 and fc1.grad.dtype == torch.float32 and fc1.grad.abs().sum() > 0
