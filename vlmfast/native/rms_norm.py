"""Launchers of the float32 RMSNorm kernels in csrc/cpu/rms_norm.cpp."""

import torch

from vlmfast.native._common import launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * (x * rstd), rstd): x (..., D) contiguous float32, rstd (rows,) for the backward."""
    record_native("rms_norm", x.device)
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    out = _alloc.empty_like(x)
    rstd = _alloc.empty(rows, dtype=torch.float32, device=x.device)
    module_for(x.device).rms_norm_forward(x=x.data_ptr(), w=weight.data_ptr(), y=out.data_ptr(), rstd=rstd.data_ptr(),
                                          rows=rows, D=width, eps=eps, **launch_args(x.device))
    return out, rstd


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of x, grad of weight)."""
    record_native("rms_norm_bwd", x.device)
    grad = grad.contiguous()
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    dx = _alloc.empty_like(x)
    dw = _alloc.empty(width, dtype=torch.float32, device=x.device)
    module_for(x.device).rms_norm_backward(dy=grad.data_ptr(), x=x.data_ptr(), w=weight.data_ptr(),
                                           rstd=rstd.data_ptr(), dx=dx.data_ptr(), dw=dw.data_ptr(), rows=rows,
                                           D=width, **launch_args(x.device))
    return dx, dw
