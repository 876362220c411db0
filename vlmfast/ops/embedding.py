"""Embedding lookup whose table can be updated in row slices during the backward.

The gradient of an embedding table is zero except on the rows of the ids looked up, yet
autograd forms it dense: a (V, D) tensor zero-filled on every backward (113 MiB for
SmolVLM2-256M's table in float32, ~180 ms of first-touch page faults on a small CPU), held
until the optimizer has used it. With weight_used_once=True and an optimizer that takes slices
(vlmfast.ops.weight_updates, e.g. vlmfast.train.AdamWInBackward), the backward fills one
slice-sized buffer at a time with the looked-up rows' gradients and hands it over: the whole
gradient never exists, and the optimizer still sees every row (AdamW decays the others' moments
and weights as a zero gradient requires).
"""

import torch
import torch.nn.functional as F

from vlmfast.ops import _checks, weight_updates


class _TableUpdatedInSlices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        ids, weight = ctx.saved_tensors
        update = weight_updates.begin_update(weight)
        padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
        if update is None:  # the optimizer wants the whole gradient this time: torch's
            return None, torch.ops.aten.embedding_dense_backward(grad, ids, weight.shape[0], padding_idx, False), None
        flat_ids = ids.reshape(-1)
        rows_grad = grad.reshape(-1, weight.shape[1])
        if ctx.padding_idx is not None:  # the padding row gets no gradient (torch's rule)
            keep = flat_ids != padding_idx
            flat_ids, rows_grad = flat_ids[keep], rows_grad[keep]
        vocab, dim = weight.shape
        rows = weight_updates.slice_rows(0, dim, vocab)
        buffer = torch.empty(rows, dim, dtype=weight.dtype, device=weight.device)
        order = torch.argsort(flat_ids)
        sorted_ids = flat_ids[order]
        bounds = torch.searchsorted(sorted_ids, torch.arange(0, vocab + rows, rows, device=ids.device)).tolist()
        for index, start in enumerate(range(0, vocab, rows)):
            stop = min(start + rows, vocab)
            part = buffer[: stop - start]
            part.zero_()
            hits = order[bounds[index] : bounds[index + 1]]
            if hits.numel():
                part.index_add_(0, flat_ids[hits] - start, rows_grad[hits].to(weight.dtype))
            update(slice(start, stop), part)
        return None, None, None


def embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, *,
              weight_used_once: bool = False) -> torch.Tensor:
    """F.embedding(ids, weight, padding_idx): ids int (...,) -> (..., D); the padding_idx row
    (nn.Embedding's) gets no gradient.

    weight_used_once: the caller's promise that this lookup is the table's only use in the graph
    (not tied to an output head). Then, if the table's optimizer steps inside the backward and
    takes slices (vlmfast.train.AdamWInBackward), it is updated slice by slice and weight.grad
    is never formed. Without such an optimizer it changes nothing.
    """
    _checks.integer("ids", ids)
    _checks.rank("weight", weight, 2, "(V, D)")
    if padding_idx is not None and not -weight.shape[0] <= padding_idx < weight.shape[0]:
        raise ValueError(f"padding_idx: expected None or an index into the {weight.shape[0]} rows, got {padding_idx}")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if weight_updates.sliced(weight, weight_used_once):
        return _TableUpdatedInSlices.apply(ids, weight, padding_idx)
    return F.embedding(ids, weight, padding_idx)
