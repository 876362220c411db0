"""Triton kernels for rotary embeddings, and their launchers.

x is seen as rows of E elements, (A, L, M, E) with strides (sa, sl, sm, 1) (see
vlmfast/runtime/layout.py): one program rotates BLOCK_ROWS rows; the (L, R/2) float32 tables are
read once per row and stay in L2. All arithmetic is float32; values are rounded to the output
dtype on store.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels._common import INTERPRETING, to_dtype_of
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.layout import rows_view


@triton.jit
def _pair_offsets(i, HALF, INTERLEAVED: tl.constexpr):
    # (i, i + R/2) for "rotate half", (2i, 2i + 1) for interleaved pairs.
    if INTERLEAVED:
        return 2 * i, 2 * i + 1
    else:
        return i, i + HALF


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, L, M, E, HALF,
    x_sa, x_sl, x_sm, o_sa, o_sl, o_sm,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    m, l, a = rows % M, (rows // M) % L, rows // (M * L)
    x_row = x_ptr + (a * x_sa + l * x_sl + m * x_sm)[:, None]
    o_row = out_ptr + (a * o_sa + l * o_sl + m * o_sm)[:, None]

    i = tl.arange(0, BLOCK_HALF)
    mask = row_ok[:, None] & (i < HALF)[None, :]
    ia, ib = _pair_offsets(i, HALF, INTERLEAVED)
    xa = tl.load(x_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
    table = l[:, None] * HALF + i[None, :]
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    if CONJUGATE:
        s = -s
    # out_a = x_a cos - x_b sin ; out_b = x_b cos + x_a sin
    tl.store(o_row + ia[None, :], to_dtype_of(xa * c - xb * s, out_ptr, ROUND_BF16), mask=mask)
    tl.store(o_row + ib[None, :], to_dtype_of(xb * c + xa * s, out_ptr, ROUND_BF16), mask=mask)

    if BLOCK_TAIL > 0:
        # Head dims from R = 2 * HALF on are not rotated: copy them.
        t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = row_ok[:, None] & (t < E)[None, :]
        tail = tl.load(x_row + t[None, :], mask=tail_mask)
        tl.store(o_row + t[None, :], tail, mask=tail_mask)


@triton.jit
def _table_backward_kernel(
    grad_ptr, x_ptr, dcos_ptr, dsin_ptr,
    L, M, rows_per_l, HALF,
    x_sa, x_sl, x_sm, g_sa, g_sl, g_sm,
    INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per sequence position l: dcos[l] = sum_rows g_a x_a + g_b x_b,
    # dsin[l] = sum_rows g_b x_a - g_a x_b, over the A * M rows sharing that angle.
    l = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    ia, ib = _pair_offsets(i, HALF, INTERLEAVED)
    acc_cos = tl.zeros((BLOCK_ROWS, BLOCK_HALF), dtype=tl.float32)
    acc_sin = tl.zeros((BLOCK_ROWS, BLOCK_HALF), dtype=tl.float32)
    for start in range(0, rows_per_l, BLOCK_ROWS):
        r = start + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        mask = (r < rows_per_l)[:, None] & (i < HALF)[None, :]
        a, m = r // M, r % M
        x_row = x_ptr + (a * x_sa + l * x_sl + m * x_sm)[:, None]
        g_row = grad_ptr + (a * g_sa + l * g_sl + m * g_sm)[:, None]
        xa = tl.load(x_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(g_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        gb = tl.load(g_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_cos += ga * xa + gb * xb
        acc_sin += gb * xa - ga * xb
    out = l * HALF + i
    tl.store(dcos_ptr + out, tl.sum(acc_cos, axis=0), mask=i < HALF)
    tl.store(dsin_ptr + out, tl.sum(acc_sin, axis=0), mask=i < HALF)


@triton.jit
def _rope_2d_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, N, QUARTER,
                    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    # Row angles fill columns [0, QUARTER), column angles [QUARTER, 2 * QUARTER).
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_Q)
    n_ok, j_ok = n < N, j < QUARTER
    mask = n_ok[:, None] & j_ok[None, :]
    row = tl.load(pos_ptr + 2 * n, mask=n_ok, other=0).to(tl.float32)
    col = tl.load(pos_ptr + 2 * n + 1, mask=n_ok, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
    row_angle = row[:, None] * inv_freq[None, :]
    col_angle = col[:, None] * inv_freq[None, :]
    out = n[:, None] * (2 * QUARTER) + j[None, :]
    tl.store(cos_ptr + out, tl.cos(row_angle), mask=mask)
    tl.store(sin_ptr + out, tl.sin(row_angle), mask=mask)
    tl.store(cos_ptr + out + QUARTER, tl.cos(col_angle), mask=mask)
    tl.store(sin_ptr + out + QUARTER, tl.sin(col_angle), mask=mask)


def _rows_per_program(block_half: int) -> int:
    # About 4K pairs per program: enough bytes in flight per SM without spilling registers.
    return max(1, min(64, 4096 // block_half))


def forward(x, cos, sin, interleaved: bool, conjugate: bool, seq_dim: int) -> torch.Tensor:
    record("rotary", "triton")
    record("rotary", "triton")
    out = _alloc.empty_like(x)
    x4, out4 = rows_view(x, seq_dim), rows_view(out, seq_dim)
    a, length, m, e = x4.shape
    half = cos.shape[-1]
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    block_half = triton.next_power_of_2(half)
    tail = e - 2 * half
    block_rows = _rows_per_program(block_half)
    n_rows = a * length * m
    _rotary_kernel[(triton.cdiv(n_rows, block_rows),)](
        x4, cos32, sin32, out4, n_rows, length, m, e, half,
        *x4.stride()[:3], *out4.stride()[:3],
        INTERLEAVED=interleaved, CONJUGATE=conjugate, ROUND_BF16=INTERPRETING,
        BLOCK_ROWS=block_rows,
        BLOCK_HALF=block_half, BLOCK_TAIL=triton.next_power_of_2(tail) if tail > 0 else 0,
    )
    return out


def table_backward(grad, x, half: int, interleaved: bool, seq_dim: int):
    record("rotary_bwd", "triton")
    record("rotary_bwd", "triton")
    x4, grad4 = rows_view(x, seq_dim), rows_view(grad, seq_dim)
    a, length, m, _ = x4.shape
    grad_cos = _alloc.empty(length, half, dtype=torch.float32, device=x.device)
    grad_sin = _alloc.empty_like(grad_cos)
    block_half = triton.next_power_of_2(half)
    _table_backward_kernel[(length,)](
        grad4, x4, grad_cos, grad_sin, length, m, a * m, half,
        *x4.stride()[:3], *grad4.stride()[:3],
        INTERLEAVED=interleaved, BLOCK_ROWS=max(1, min(32, 2048 // block_half)),
        BLOCK_HALF=block_half,
    )
    return grad_cos, grad_sin


def rope_2d(positions, inv_freq):
    record("rope_2d", "triton")
    record("rope_2d", "triton")
    positions = positions.to(torch.int64).contiguous()
    n, quarter = positions.shape[0], inv_freq.shape[0]
    cos = _alloc.empty(n, 2 * quarter, dtype=torch.float32, device=positions.device)
    sin = _alloc.empty_like(cos)
    block_n = 64
    _rope_2d_kernel[(triton.cdiv(n, block_n),)](
        positions, inv_freq.contiguous(), cos, sin, n, quarter,
        BLOCK_N=block_n, BLOCK_Q=triton.next_power_of_2(quarter),
    )
    return cos, sin
