"""Dense attention as custom ops, `vlmfast::attention_fwd` / `_bwd` (fake impls + autograd: what
torch.compile traces and opcheck checks), and `attention()`, the entry the public function
calls: eager calls on plain CPU / CUDA tensors run the same backends through one
autograd.Function instead, without the custom op's dispatch (its Python layers cost ~20 us a
forward and as much again a backward, several times the kernels of a small call).

Shapes: q (B, H, L, E), k / v (B, Hkv, S, E), bias float32 expanded to (B, H, L, S) or None,
rotary tables (L, R/2) or None. attention_fwd returns (out, lse float32 (B, H, L)).
"""

import torch

from vlmfast.ops import _dispatch
from vlmfast.ops.attention import backends

_EAGER_DEVICES = ("cpu", "cuda")  # not meta / fake tensors: those need the op's fake impl


@torch.library.custom_op("vlmfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
    is_causal: bool, cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, E), lse float32 (B, H, L)) for q (B, H, L, E), k/v (B, Hkv, S, E), an
    optional float32 bias expanded to (B, H, L, S), rotary tables (L, R/2) or None."""
    backend = _dispatch.select("attention", q.device, q.dtype)
    return backends.forward(backend, q, k, v, bias, scale, is_causal, cos, sin)


@attention_fwd.register_fake
def _(q, k, v, bias, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype(q))


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("vlmfast::attention_bwd", mutates_args=())
def attention_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias: torch.Tensor | None, scale: float, is_causal: bool,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v): dk, dv summed over each GQA group."""
    backend = _dispatch.select("attention", q.device, q.dtype)
    return backends.backward(backend, grad, q, k, v, out, lse, bias, scale, is_causal, cos, sin)


@attention_bwd.register_fake
def _(grad, q, k, v, out, lse, bias, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, is_causal, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cos, sin)
    ctx.options = (scale, is_causal)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, cos, sin = ctx.saved_tensors
    scale, is_causal = ctx.options
    dq, dk, dv = attention_bwd(grad_out.contiguous(), q, k, v, out, lse, bias, scale, is_causal,
                               cos, sin)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """attention_fwd's forward and backward for eager calls, minus the custom-op layers."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, is_causal, cos, sin, backend):
        out, lse = backends.forward(backend, q, k, v, bias, scale, is_causal, cos, sin)
        ctx.save_for_backward(q, k, v, out, lse, bias, cos, sin)
        ctx.options = (backend, scale, is_causal)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias, cos, sin = ctx.saved_tensors
        backend, scale, is_causal = ctx.options
        dq, dk, dv = backends.backward(backend, grad_out.contiguous(), q, k, v, out, lse, bias,
                                       scale, is_causal, cos, sin)
        return dq, dk, dv, None, None, None, None, None, None


def eager(backend: str, q, k, v, bias, scale: float, is_causal: bool, cos, sin) -> torch.Tensor:
    """The output on `backend`, differentiable in q, k, v: for eager calls on plain tensors
    whose checks are done (`attention` below, lean.py), with nothing traced."""
    return _EagerAttention.apply(q, k, v, bias, scale, is_causal, cos, sin, backend)


def attention(q, k, v, bias, scale: float, is_causal: bool, cos, sin) -> torch.Tensor:
    """The attention output (B, H, L, E). Compiling, tensor subclasses (fake, functional) and
    torch.func transforms go through the custom op; eager calls skip its dispatch: with
    nothing to differentiate straight to the backend, else through _EagerAttention. Tables and
    a bias never need a gradient here (the public function handles those)."""
    if (
        torch.compiler.is_compiling()
        or type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor
        or q.device.type not in _EAGER_DEVICES
        or torch._C._are_functorch_transforms_active()
    ):
        return attention_fwd(q, k, v, bias, scale, is_causal, cos, sin)[0]
    backend = _dispatch.select("attention", q.device, q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, bias, scale, is_causal, cos, sin, backend)
    return backends.forward(backend, q, k, v, bias, scale, is_causal, cos, sin)[0]
