"""AdamWInBackward: stepping each parameter from its gradient hook gives the weights and state
of torch's AdamW step on the same gradients (tiny SmolVLM, with and without gradient
checkpointing), frees every gradient, follows set_lr, and can be removed."""

import copy

import pytest
import torch

from tests.models.smolvlm_helpers import IMAGE_TOKEN, build_batch, tiny_model
from vlmfast.ops import _lce_slices, weight_updates
from vlmfast.train.adamw_in_backward import AdamWInBackward

ROWS = [(5, 3, 4, None), (1, 2, 9, (17, 24))]
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


@pytest.fixture(autouse=True)
def fused_loss_on_both_sides(monkeypatch):
    """Both sides' loss through the fused op: with no in-backward optimizer registered the plain
    side would take its few labelled rows through materialised logits (models/token_head.py),
    whose rounding differs from the fused op's; AdamW's normalisation carries such differences
    of near-zero gradients into the weights, and these tests compare the optimizers."""
    from vlmfast.models import token_head

    monkeypatch.setattr(token_head, "MATERIALISED_LOGITS", 0)


def _loss(model, seed):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=seed)
    labels = torch.where(mask.bool() & (ids != IMAGE_TOKEN), ids, torch.full_like(ids, -100))
    return model.loss(ids, labels, pixels, pixel_mask, mask)


def _train_side_by_side(plain, optimizer, stepped, steps):
    """`steps` steps on the same batches: torch's AdamW on `plain`, the in-backward stepper
    (already attached) on `stepped`, whose gradients are gone after each backward."""
    for step in range(steps):
        _loss(plain, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _loss(stepped, step).backward()
        assert all(p.grad is None for p in stepped.parameters())


def _assert_same_weights(stepped, plain):
    weights = dict(stepped.named_parameters())
    for name, p in plain.named_parameters():
        # the untied head's gradient is formed in slices from step 2 (rounded unlike the whole-
        # gradient kernel's); AdamW's normalisation carries such rounding of near-zero
        # gradients into the weights at ~1e-6 (lr 1e-2)
        torch.testing.assert_close(weights[name], p, rtol=1e-5, atol=5e-6, msg=name)
    return weights


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_same_weights_as_adamw_after_steps(checkpointing, fused):
    plain = tiny_model().train()
    for p in plain.model.vision_model.embeddings.parameters():
        p.requires_grad_(False)  # frozen parameters are left alone
    stepped = copy.deepcopy(plain).set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], fused=fused, **OPTIONS)
    stepper = AdamWInBackward(stepped.parameters(), fused=fused, **OPTIONS)
    _train_side_by_side(plain, optimizer, stepped, steps=2)
    weights = _assert_same_weights(stepped, plain)
    moved = weights["model.text_model.layers.0.mlp.gate_up.weight"]
    assert not torch.equal(moved, tiny_model().model.text_model.layers[0].mlp.gate_up.weight)
    first = stepper.optimizers[moved].state[moved]
    assert float(first["step"]) == 2 and first["exp_avg_sq"].abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied head", "tied head"])
def test_head_updated_in_slices_only_when_untied(tied, monkeypatch):
    """From the second step (the first creates the state) an untied head's AdamW update is
    taken slice by slice in the loss's backward; a tied head, whose gradient also comes from
    the embedding, gets the usual whole-gradient step. Both equal torch's AdamW."""
    monkeypatch.setattr(weight_updates, "SLICE_BYTES", 1)  # 64-row slices: 200 rows in 4
    calls = []
    sliced = _lce_slices.backward
    monkeypatch.setattr(_lce_slices, "backward", lambda *a, **k: calls.append(1) or sliced(*a, **k))
    plain = tiny_model(seed=3, tied=tied).train()
    stepped = copy.deepcopy(plain)
    optimizer = torch.optim.AdamW(plain.parameters(), fused=True, **OPTIONS)
    stepper = AdamWInBackward(stepped.parameters(), fused=True, **OPTIONS)
    _train_side_by_side(plain, optimizer, stepped, steps=3)
    assert len(calls) == (0 if tied else 2)
    _assert_same_weights(stepped, plain)
    head = stepped.head_weight
    expected, state = optimizer.state[plain.head_weight], stepper.optimizers[head].state[head]
    assert float(state["step"]) == float(expected["step"]) == 3
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-8, msg=key)
    assert head.grad is None


def test_set_lr_and_remove():
    model = tiny_model(seed=1).train()
    stepper = AdamWInBackward(model.parameters(), lr=1e-2, weight_decay=0.0)
    stepper.set_lr(0.0)
    before = copy.deepcopy(model.state_dict())
    _loss(model, 0).backward()  # lr 0: the state moves, the weights do not
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    stepper.remove()
    _loss(model, 1).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_state_round_trip():
    model = tiny_model(seed=2).train()
    stepper = AdamWInBackward(model.parameters(), lr=1e-2)
    _loss(model, 0).backward()
    other = AdamWInBackward(copy.deepcopy(model).parameters(), lr=1e-2)
    other.load_state_dict(stepper.state_dict())
    with pytest.raises(ValueError, match="states: expected"):
        other.load_state_dict(stepper.state_dict()[:1])


def test_bad_params_name_the_argument():
    with pytest.raises(ValueError, match="params: expected at least one parameter that requires grad"):
        AdamWInBackward([torch.zeros(2)])
    with pytest.raises(TypeError, match="params: expected tensors or parameter groups"):
        AdamWInBackward([torch.zeros(2, requires_grad=True), 3.0], lr=1e-3)
