"""The one backward loop of linear + cross-entropy, over vocabulary chunks (torch only: no Triton).

With the forward's log-sum-exp a chunk [c0, c0 + C) of the vocabulary needs only its own logits:
    G = s * (exp(z - lse) - (1 - eps) onehot - eps / V)        (N, C)
    d hidden += G W[chunk],   d W[chunk] = G^T hidden,   d bias[chunk] = sum_i G_i
`grad_logits(c0, width)` makes G (the Triton kernel on a GPU, torch ops elsewhere); this loop runs
the two GEMMs and hands each d W[chunk] either to a (V, D) gradient or to `update(slice, rows)`,
the optimizer that takes the weight's gradient in slices (vlmfast.ops.weight_updates): the chunk's
share of d hidden is taken before its update changes W[chunk].

G comes in the inputs' dtype for float16 / bfloat16 (the GEMMs then run on 16-bit operands with
float32 accumulation, as torch's materialised backward does) and in float32 otherwise. d hidden
sums the chunks in float32.
"""

import functools

import torch


@functools.cache
def _mm_out_dtype_works() -> bool:
    """Whether torch.mm(a16, b16, out_dtype=torch.float32) runs on CUDA here (torch >= 2.8)."""
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32: 16-bit operands multiplied exactly, float32 sums (the tensor cores' way)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_out_dtype_works():
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.is_cuda:
        return (a @ b).float()  # older torch: cuBLAS still accumulates in float32, rounds the result once
    return a.float() @ b.float()


def mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b rounded once to `dtype`, accumulated in float32."""
    if a.is_cuda or a.dtype == torch.float32:
        return (a @ b).to(dtype)
    return (a.float() @ b.float()).to(dtype)


@torch.no_grad()
def backward(hidden, weight, bias, chunk: int, grad_logits, update=None):
    """(grad_hidden (N, D) in hidden's dtype, grad_weight (V, D) in weight's dtype or None when
    `update` takes it slice by slice, grad_bias float32 (V,) or None without a bias)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    weight = weight.detach()
    grad_hidden = torch.zeros(n, d, dtype=torch.float32, device=hidden.device)
    grad_weight = None if update is not None else torch.empty(vocab, d, dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if bias is not None else None
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        g = grad_logits(c0, width)  # (N, width)
        w = weight[c0 : c0 + width]
        grad_hidden += mm_f32(g, w.to(g.dtype))
        if grad_bias is not None:
            grad_bias[c0 : c0 + width] = g.sum(0, dtype=torch.float32)
        rows = mm_as(g.T, hidden.to(g.dtype), weight.dtype)
        if update is not None:
            update(slice(c0, c0 + width), rows)
        else:
            grad_weight[c0 : c0 + width] = rows
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def torch_grad_logits(hidden, weight, bias, labels, lse, scale, label_smoothing: float):
    """grad_logits(c0, width) for backward() from torch ops (float32 G): for backends without a
    G kernel. labels: -1 on rows without a target; scale: 0 on them."""
    hidden32 = hidden.float()
    lse32 = lse.float()[:, None]
    scale32 = scale.float()[:, None]
    vocab, eps = weight.shape[0], float(label_smoothing)

    def grad_logits(c0: int, width: int) -> torch.Tensor:
        g = hidden32 @ weight[c0 : c0 + width].float().T
        if bias is not None:
            g += bias[c0 : c0 + width].float()
        g.sub_(lse32).exp_()
        if eps:
            g.sub_(eps / vocab)
        hit = ((labels >= c0) & (labels < c0 + width)).nonzero().squeeze(1)
        g[hit, labels[hit] - c0] -= 1 - eps
        return g.mul_(scale32)

    return grad_logits
