"""The decoder's last layer computed on the rows that are read (vlmfast/models/last_rows.py): a
loss whose labels sit at the end, and a prefill, give what the full layer gives, for LLaVA's
Llama decoder and BLIP-2's OPT (pre- and post-norm), with left padding and gradient
checkpointing; the first predicting row over a batch."""

import pytest
import torch

from tests.models.blip2 import checkpoint as blip2_checkpoint
from tests.models.blip2.test_blip2 import batch as blip2_batch
from tests.models.llava import checkpoint as llava_checkpoint
from tests.models.llava.test_llava import batch as llava_batch
from vlmfast.models.blip2 import Blip2
from vlmfast.models.last_rows import first_predicting_row, rows_mask
from vlmfast.models.llava import Llava

MODELS = ["llava", "blip2-pre-norm-tied", "blip2-post-norm-untied"]


@pytest.fixture(scope="module", params=MODELS)
def model_and_batch(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        model = Llava.from_pretrained(llava_checkpoint.write_checkpoint(folder, seed=5))
        ids, mask, pixels = llava_batch(model, [(1, 3, 6, 0), (1, 1, 5, 3)], seed=6)
    else:
        layout = request.param.removeprefix("blip2-")
        model = Blip2.from_pretrained(blip2_checkpoint.write_checkpoint(folder, layout=layout, seed=5))
        ids, mask, pixels = blip2_batch(model, [7, 4], seed=6)
    return model, ids, mask, pixels


def _labels(ids, mask, last: int):
    """Labels on each row's last `last` tokens (-100 elsewhere and on padding)."""
    labels = torch.full_like(ids, -100)
    labels[:, -last:] = ids[:, -last:]
    return labels.masked_fill(mask == 0, -100)


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_on_the_read_rows_equals_the_full_layer(model_and_batch, checkpointing):
    model, ids, mask, pixels = model_and_batch
    labels = _labels(ids, mask, 3)
    first = first_predicting_row(labels)
    assert first == ids.shape[1] - 4  # the last layer runs 3 of the rows
    model.set_gradient_checkpointing(checkpointing)
    try:
        pruned, pruned_grads = _loss_and_grads(model, lambda: model.loss(ids, labels, pixels, mask))
        full, full_grads = _loss_and_grads(
            model, lambda: model.next_token_loss(model.hidden_states(ids, pixels, mask), labels))
    finally:
        model.set_gradient_checkpointing(False)
        model.zero_grad()
    assert abs(pruned.item() - full.item()) <= 1e-6 * abs(full.item())
    assert pruned_grads.keys() == full_grads.keys() and any("layers" in name for name in full_grads)
    for name, want in full_grads.items():
        scale = max(want.abs().max().item(), 1e-6)
        assert (pruned_grads[name] - want).abs().max().item() <= 1e-5 * scale, name


def test_hidden_states_of_the_read_rows(model_and_batch):
    model, ids, mask, pixels = model_and_batch
    with torch.no_grad():
        full = model.hidden_states(ids, pixels, mask)
        rows = model.hidden_states(ids, pixels, mask, first_row=ids.shape[1] - 5)
    assert rows.shape == (ids.shape[0], 5, full.shape[-1])
    assert (rows - full[:, -5:]).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_prefill_logits_equal_the_forward_last_row(model_and_batch):
    model, ids, mask, pixels = model_and_batch
    with torch.no_grad():
        expected = model(ids, pixels, mask)[:, -1].float()
        cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
        logits, _ = model.prefill(ids, pixels, None, mask.bool(), cache)
    assert (logits - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_first_predicting_row():
    labels = torch.full((2, 6), -100)
    assert first_predicting_row(labels) == 0  # nothing labelled: every row as before
    labels[0, 5], labels[1, 3] = 7, 8
    assert first_predicting_row(labels) == 2  # row 1's label at 3 is predicted from position 2
    labels[1, 0] = 9  # a label at position 0 is predicted by no row
    assert first_predicting_row(labels) == 2


def test_rows_mask_writes_the_causal_rule_out():
    mask, causal = rows_mask(None, True, 3, 5, 5, "cpu")
    assert causal is False and torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril()[3:])
    padding = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S): no query dim
    mask, _ = rows_mask(padding, True, 3, 5, 5, "cpu")
    assert torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril()[3:] & padding)
    full = torch.rand(2, 1, 5, 5) > 0.5
    mask, _ = rows_mask(full, False, 2, 5, 5, "cpu")
    assert torch.equal(mask, full[:, :, 2:])
