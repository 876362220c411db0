"""Launchers of the SwiGLU kernels in csrc/cpu/swiglu.cpp."""

import torch

from vlmfast.native._common import dtype_tag, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native
from vlmfast.runtime.layout import matrix_view


def forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., I), contiguous."""
    record_native("swiglu", gate_up.device)
    rows = matrix_view(gate_up)
    width = gate_up.shape[-1] // 2
    out = _alloc.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    module_for(gate_up.device).swiglu_forward(
        gate_up=rows.data_ptr(), out=out.data_ptr(), rows=rows.shape[0], I=width, stride=rows.stride(0),
        dtype=dtype_tag(gate_up), **launch_args(gate_up.device),
    )
    return out


def backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of gate_up, (..., 2 I), contiguous."""
    record_native("swiglu_bwd", gate_up.device)
    rows = matrix_view(gate_up)
    grad = grad.contiguous()
    out = _alloc.empty_like(gate_up)
    module_for(gate_up.device).swiglu_backward(
        grad=grad.data_ptr(), gate_up=rows.data_ptr(), grad_gate_up=out.data_ptr(), rows=rows.shape[0],
        I=gate_up.shape[-1] // 2, stride=rows.stride(0), dtype=dtype_tag(gate_up), **launch_args(gate_up.device),
    )
    return out
