"""Launchers of the contrastive-loss kernels in csrc/cpu/contrastive.cpp.

Features arrive as (B, D) with a contiguous feature dim (any row stride) in float32, float16 or
bfloat16; the kernels read them in float32 and never hold the B x B logits. Losses and the
scale / bias gradients come back as Python floats (the kernels sum them in double) and are
returned as float32 tensors; feature gradients are written in the features' dtype.
"""

import torch

from vlmfast.native._common import dtype_tag, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous feature dim, as the kernels index rows by a stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _features(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = _rows(a), _rows(b)
    return dict(a=a.data_ptr(), b=b.data_ptr(), B=a.shape[0], D=a.shape[1], a_stride=a.stride(0),
                b_stride=b.stride(0), dtype=dtype_tag(a), **launch_args(a.device)), (a, b)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def infonce_forward(a, b, scale: float):
    """(loss, row_lse, col_lse): float32 (), (B,), (B,)."""
    record_native("infonce", a.device)
    args, keep = _features(a, b)
    row_lse = _alloc.empty(a.shape[0], dtype=torch.float32, device=a.device)
    col_lse = _alloc.empty_like(row_lse)
    loss = module_for(a.device).infonce_forward(
        **args, scale=scale, row_lse=row_lse.data_ptr(), col_lse=col_lse.data_ptr()
    )
    del keep
    return _scalar(loss, a), row_lse, col_lse


def infonce_backward(grad: float, a, b, scale: float, row_lse, col_lse):
    """(grad_a, grad_b, grad_scale): (B, D) in a's dtype twice, float32 ()."""
    record_native("infonce_bwd", a.device)
    args, keep = _features(a, b)
    grad_a, grad_b = _alloc.empty(a.shape, dtype=a.dtype, device=a.device), _alloc.empty(
        b.shape, dtype=b.dtype, device=b.device
    )
    grad_scale = module_for(a.device).infonce_backward(
        **args, scale=scale, row_lse=row_lse.contiguous().data_ptr(),
        col_lse=col_lse.contiguous().data_ptr(), grad=grad, grad_a=grad_a.data_ptr(),
        grad_b=grad_b.data_ptr(),
    )
    del keep
    return grad_a, grad_b, _scalar(grad_scale, a)


def siglip_forward(a, b, scale: float, bias: float) -> torch.Tensor:
    """The loss, float32 ()."""
    record_native("siglip", a.device)
    args, keep = _features(a, b)
    loss = module_for(a.device).siglip_forward(**args, scale=scale, bias=bias)
    del keep
    return _scalar(loss, a)


def _siglip_grads(kernel: str, grad: float, a, b, scale: float, bias: float):
    """Runs the backward kernel `kernel`: (its float results, grad_a, grad_b)."""
    args, keep = _features(a, b)
    grad_a, grad_b = _alloc.empty(a.shape, dtype=a.dtype, device=a.device), _alloc.empty(
        b.shape, dtype=b.dtype, device=b.device
    )
    results = getattr(module_for(a.device), kernel)(
        **args, scale=scale, bias=bias, grad=grad, grad_a=grad_a.data_ptr(), grad_b=grad_b.data_ptr()
    )
    del keep
    return results, grad_a, grad_b


def siglip_backward(grad: float, a, b, scale: float, bias: float):
    """(grad_a, grad_b, grad_scale, grad_bias): (B, D) in a's dtype twice, float32 () twice."""
    record_native("siglip_bwd", a.device)
    (grad_scale, grad_bias), grad_a, grad_b = _siglip_grads("siglip_backward", grad, a, b, scale, bias)
    return grad_a, grad_b, _scalar(grad_scale, a), _scalar(grad_bias, a)


def siglip_forward_backward(a, b, scale: float, bias: float):
    """(loss, grad_a, grad_b, grad_scale, grad_bias) of the loss itself (upstream gradient 1), from
    one pass over the logits: float32 (), (B, D) in a's dtype twice, float32 () twice."""
    record_native("siglip_fwd_bwd", a.device)
    (loss, grad_scale, grad_bias), grad_a, grad_b = _siglip_grads("siglip_forward_backward", 1.0, a, b,
                                                                  scale, bias)
    return _scalar(loss, a), grad_a, grad_b, _scalar(grad_scale, a), _scalar(grad_bias, a)
