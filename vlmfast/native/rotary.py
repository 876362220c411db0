"""Launchers of the rotary kernels in csrc/cpu/rotary.cpp and csrc/cuda/rotary.cu."""

import torch

from vlmfast.native._common import dtype_tag, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native
from vlmfast.runtime.layout import rows_view


def forward(x, cos, sin, interleaved: bool, conjugate: bool, seq_dim: int) -> torch.Tensor:
    """x rotated by the angles of (cos, sin), or by their negatives with `conjugate`."""
    record_native("rotary", x.device)
    out = _alloc.empty_like(x)
    x4, out4 = rows_view(x, seq_dim), rows_view(out, seq_dim)
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    module_for(x.device).rotary_forward(
        x=x4.data_ptr(), cos=cos32.data_ptr(), sin=sin32.data_ptr(), out=out4.data_ptr(),
        sizes=(*x4.shape, cos.shape[-1]), x_strides=x4.stride()[:3], out_strides=out4.stride()[:3],
        dtype=dtype_tag(x), interleaved=interleaved, conjugate=conjugate, **launch_args(x.device),
    )
    return out


def table_backward(grad, x, half: int, interleaved: bool, seq_dim: int):
    """(grad_cos, grad_sin), float32 (L, half): the gradients of the rotation's tables."""
    record_native("rotary_bwd", x.device)
    x4, grad4 = rows_view(x, seq_dim), rows_view(grad, seq_dim)
    length = x4.shape[1]
    grad_cos = _alloc.empty(length, half, dtype=torch.float32, device=x.device)
    grad_sin = _alloc.empty_like(grad_cos)
    module_for(x.device).rotary_table_backward(
        grad=grad4.data_ptr(), x=x4.data_ptr(), grad_cos=grad_cos.data_ptr(),
        grad_sin=grad_sin.data_ptr(), sizes=(*x4.shape, half), x_strides=x4.stride()[:3],
        grad_strides=grad4.stride()[:3], dtype=dtype_tag(x), interleaved=interleaved,
        **launch_args(x.device),
    )
    return grad_cos, grad_sin


def rope_2d(positions, inv_freq) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, 2 * len(inv_freq)) for (N, 2) integer positions."""
    record_native("rope_2d", positions.device)
    positions = positions.to(torch.int64).contiguous()
    n, quarter = positions.shape[0], inv_freq.shape[0]
    cos = _alloc.empty(n, 2 * quarter, dtype=torch.float32, device=positions.device)
    sin = _alloc.empty_like(cos)
    module_for(positions.device).rope_2d_forward(
        positions=positions.data_ptr(), n=n, inv_freq=inv_freq.contiguous().data_ptr(),
        quarter=quarter, cos=cos.data_ptr(), sin=sin.data_ptr(), **launch_args(positions.device),
    )
    return cos, sin
