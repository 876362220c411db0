"""Triton kernels for SwiGLU's gate, silu(gate) * up, and their launchers.

gate_up is seen as rows of 2 I elements, row stride `stride` (last dim contiguous): the gate in
columns [0, I), up in [I, 2 I). One program takes BLOCK_ROWS rows x BLOCK columns of the output.
Arithmetic is float32; values are rounded to the dtype where the eager composite F.silu(gate) * up
rounds (after silu, after each product of its backward), so 16-bit results follow it.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common
from vlmfast.kernels._common import INTERPRETING, to_dtype_of
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.layout import matrix_view


@triton.jit
def _rounded(v, ptr, ROUND_BF16: tl.constexpr):
    # v (float32) rounded to the element type of ptr and widened back: a value the composite
    # stores in that dtype between two of its ops.
    return to_dtype_of(v, ptr, ROUND_BF16).to(tl.float32)


@triton.jit
def _tile(n_rows, I, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return rows, cols, (rows < n_rows)[:, None] & (cols < I)[None, :]


@triton.jit
def _swiglu_forward_kernel(
    gate_up_ptr, out_ptr, n_rows, I, stride,
    ROUND_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # out = round(silu(gate)) * up
    rows, cols, mask = _tile(n_rows, I, BLOCK_ROWS, BLOCK)
    gate_ptrs = gate_up_ptr + rows[:, None] * stride + cols[None, :]
    g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    silu = _rounded(g * tl.sigmoid(g), out_ptr, ROUND_BF16)
    tl.store(out_ptr + rows[:, None] * I + cols[None, :], to_dtype_of(silu * u, out_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_ptr, gate_up_ptr, grad_gate_up_ptr, n_rows, I, stride,
    ROUND_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # d up = grad * round(silu(gate)); d gate = round(grad * up) * sigma (1 + gate (1 - sigma))
    rows, cols, mask = _tile(n_rows, I, BLOCK_ROWS, BLOCK)
    gate_ptrs = gate_up_ptr + rows[:, None] * stride + cols[None, :]
    g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_ptr + rows[:, None] * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sigma = tl.sigmoid(g)
    silu = _rounded(g * sigma, grad_gate_up_ptr, ROUND_BF16)
    d_silu = _rounded(dy * u, grad_gate_up_ptr, ROUND_BF16)
    d_gate = d_silu * (sigma * (1.0 + g * (1.0 - sigma)))
    out = grad_gate_up_ptr + rows[:, None] * (2 * I) + cols[None, :]
    tl.store(out, to_dtype_of(d_gate, grad_gate_up_ptr, ROUND_BF16), mask=mask)
    tl.store(out + I, to_dtype_of(dy * silu, grad_gate_up_ptr, ROUND_BF16), mask=mask)


# ----------------------------------------------------------------------------- configs

BLOCK = 1024  # output columns a program takes (wider I loops over the grid's second axis)
BLOCK_ROWS = 4  # 4K elements a program: enough bytes in flight
NUM_WARPS = 8  # 16 elements a thread: float32's backward at 4 warps took 128 registers (1/4 occupancy)


def grid(rows: int, width: int) -> tuple[int, int]:
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(width, BLOCK))


def _types(dtype: torch.dtype) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    return {"gate_up_ptr": data, "out_ptr": data, "grad_ptr": data, "grad_gate_up_ptr": data}


def variants(target: str) -> list:
    """Every compile the launchers can ask for (one tile on every target)."""
    # Representative launch: SmolVLM2's decoder MLP, 4096 rows of I = 1536, contiguous.
    ints = dict(n_rows=4096, I=1536, stride=2 * 1536)
    return [_common.Variant(kernel, _types(dtype), dict(ROUND_BF16=False, BLOCK_ROWS=BLOCK_ROWS, BLOCK=BLOCK),
                            {"num_warps": NUM_WARPS}, dtype, case="rows", ints=ints)
            for dtype in _common.KERNEL_DTYPES for kernel in (_swiglu_forward_kernel, _swiglu_backward_kernel)]


# ----------------------------------------------------------------------------- launchers


def forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., I), contiguous."""
    record("swiglu", "triton")
    rows = matrix_view(gate_up)
    width = gate_up.shape[-1] // 2
    out = _alloc.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    _common.launch(_swiglu_forward_kernel, grid(rows.shape[0], width), rows, out, rows.shape[0], width,
                   rows.stride(0), ROUND_BF16=INTERPRETING, BLOCK_ROWS=BLOCK_ROWS, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of gate_up, (..., 2 I), contiguous."""
    record("swiglu_bwd", "triton")
    rows = matrix_view(gate_up)
    grad = grad.contiguous()
    width = gate_up.shape[-1] // 2
    out = _alloc.empty_like(gate_up)
    _common.launch(_swiglu_backward_kernel, grid(rows.shape[0], width), grad, rows, out, rows.shape[0], width,
                   rows.stride(0), ROUND_BF16=INTERPRETING, BLOCK_ROWS=BLOCK_ROWS, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
