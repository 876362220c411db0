"""The backward of linear + cross-entropy over vocabulary slices, each slice of the weight's
gradient handed to the weight's optimizer (vlmfast.ops.weight_updates) as soon as it is made
and then freed: the (V, D) weight gradient never exists whole.

With the forward's log-sum-exp a slice [v0, v1) needs only its own logits:
    G = s * (exp(z - lse) - (1 - eps) onehot - eps / V)      (N, v1 - v0), float32
    d hidden += G W[v0:v1],   d W[v0:v1] = G^T hidden,   d bias[v0:v1] = sum_i G_i
where s is each row's weight in the loss (0 on ignored rows). The slice's share of d hidden is
taken before its update changes W[v0:v1].
"""

import torch

from vlmfast.ops import reference, weight_updates


@torch.no_grad()
def backward(hidden, weight, bias, labels, lse, row_scale, ignore_index: int, label_smoothing: float,
             update, rows: int | None = None):
    """(grad_hidden (N, D) in hidden's dtype, grad_bias float32 (V,) or None); the weight's
    gradient goes to update(slice, grad_rows) slice by slice. row_scale: (N,) each row's weight."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    rows = rows or weight_updates.slice_rows(n, d, vocab)
    valid = reference.lce_valid(labels, ignore_index, vocab)
    scale = torch.where(valid, row_scale.float(), torch.zeros((), device=hidden.device))[:, None]
    target = torch.where(valid, labels, -1)
    hidden32 = hidden.float()
    lse32 = lse.float()[:, None]
    weight = weight.detach()
    grad_hidden = torch.zeros(n, d, dtype=torch.float32, device=hidden.device)
    grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if bias is not None else None
    eps = float(label_smoothing)
    for start in range(0, vocab, rows):
        stop = min(start + rows, vocab)
        weight32 = weight[start:stop].float()
        g = hidden32 @ weight32.T
        if bias is not None:
            g += bias[start:stop].float()
        g.sub_(lse32).exp_()
        if eps:
            g.sub_(eps / vocab)
        hit = ((target >= start) & (target < stop)).nonzero().squeeze(1)
        g[hit, target[hit] - start] -= 1 - eps
        g.mul_(scale)
        grad_hidden.addmm_(g, weight32)
        if grad_bias is not None:
            grad_bias[start:stop] = g.sum(0)
        update(slice(start, stop), (g.T @ hidden32).to(weight.dtype))
    return grad_hidden.to(hidden.dtype), grad_bias
