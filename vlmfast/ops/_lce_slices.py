"""The backward of linear + cross-entropy over vocabulary slices, each slice of the weight's
gradient handed to the weight's optimizer (vlmfast.ops.weight_updates) as soon as it is made
and then freed: the (V, D) weight gradient never exists whole.

With the forward's log-sum-exp a slice [v0, v1) needs only its own logits:
    G = s * (exp(z - lse) - (1 - eps) onehot - eps / V)      (N, v1 - v0)
    d hidden += G W[v0:v1],   d W[v0:v1] = G^T hidden,   d bias[v0:v1] = sum_i G_i
where s is each row's weight in the loss (0 on ignored rows). The slice's share of d hidden is
taken before its update changes W[v0:v1]. The loop is the one every backward of the op runs
(kernels/lce_chunks.py); G comes from the Triton kernel where Triton runs the op, else from
torch.
"""

import torch

from vlmfast.kernels import lce_chunks
from vlmfast.ops import _dispatch, reference, weight_updates


@torch.no_grad()
def backward(hidden, weight, bias, labels, lse, row_scale, ignore_index: int, label_smoothing: float,
             update, rows: int | None = None):
    """(grad_hidden (N, D) in hidden's dtype, grad_bias float32 (V,) or None); the weight's
    gradient goes to update(slice, grad_rows) slice by slice. row_scale: (N,) each row's weight."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    rows = rows or weight_updates.slice_rows(n, d, vocab)
    if _dispatch.select("linear_cross_entropy", hidden.device, hidden.dtype) == "triton":
        from vlmfast.kernels import linear_cross_entropy as triton_lce

        grad_hidden, _, grad_bias = triton_lce.backward(hidden, weight.detach(), bias, labels, lse, row_scale,
                                                        ignore_index, label_smoothing, vocab_chunk=rows,
                                                        update=update)
        return grad_hidden, grad_bias
    valid = reference.lce_valid(labels, ignore_index, vocab)
    scale = torch.where(valid, row_scale.float(), torch.zeros((), device=hidden.device))
    target = torch.where(valid, labels, -1)
    grad_logits = lce_chunks.torch_grad_logits(hidden, weight.detach(), bias, target, lse, scale, label_smoothing)
    grad_hidden, _, grad_bias = lce_chunks.backward(hidden, weight, bias, rows, grad_logits, update)
    return grad_hidden, grad_bias
