"""Launcher of the fused linear + cross-entropy kernel in csrc/cpu/linear_cross_entropy.cpp.

hidden (N, D) and weight (V, D) of one dtype (float32, float16, bfloat16) with a contiguous
feature dim (any row stride), bias (V,) of any float dtype (read as float32), labels (N,) int64.
"""

import torch

from vlmfast.native._common import dtype_tag, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, row_scale=None,
            block_rows: int = 0):
    """(loss_rows, lse, grad_hidden, grad_weight, grad_bias).

    loss_rows, lse: float32 (N,), the per-row loss (0 on ignored rows) and log-sum-exp. With
    row_scale (N,) given, the gradients of sum_i row_scale_i * loss_i: grad_hidden (N, D) and
    grad_weight (V, D) in the inputs' dtype, grad_bias float32 (V,) (None without a bias);
    without row_scale all three are None. block_rows: rows per logit block (0: the kernel's
    choice, about 64 MiB of float32 logits; tests make it small to cover several blocks).
    """
    record_native("linear_cross_entropy", hidden.device)
    hidden, weight = _rows(hidden), _rows(weight)
    labels = labels.to(torch.int64).contiguous()
    (n, d), v = hidden.shape, weight.shape[0]
    device = hidden.device
    lse = _alloc.empty(n, dtype=torch.float32, device=device)
    loss_rows = _alloc.empty_like(lse)
    bias32 = bias.float().contiguous() if bias is not None else None
    grad_hidden = grad_weight = grad_bias = scale32 = None
    if row_scale is not None:
        scale32 = row_scale.float().contiguous()
        grad_hidden = _alloc.empty(n, d, dtype=hidden.dtype, device=device)
        grad_weight = _alloc.empty(v, d, dtype=weight.dtype, device=device)
        grad_bias = _alloc.empty(v, dtype=torch.float32, device=device) if bias is not None else None

    def address(t):
        return t.data_ptr() if t is not None else 0

    module_for(device).linear_cross_entropy(
        hidden=hidden.data_ptr(), weight=weight.data_ptr(), bias=address(bias32),
        labels=labels.data_ptr(), sizes=(n, d, v), strides=(hidden.stride(0), weight.stride(0)),
        ignore_index=int(ignore_index), label_smoothing=float(label_smoothing), block_rows=int(block_rows), lse=lse.data_ptr(),
        loss_rows=loss_rows.data_ptr(), row_scale=address(scale32), grad_hidden=address(grad_hidden),
        grad_weight=address(grad_weight), grad_bias=address(grad_bias), dtype=dtype_tag(hidden),
        **launch_args(device),
    )
    return loss_rows, lse, grad_hidden, grad_weight, grad_bias
