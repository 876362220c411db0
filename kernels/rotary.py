"""Triton kernels for rotary embeddings, and their launchers.

x is seen as rows of E elements, (A, L, M, E) with strides (sa, sl, sm, 1) (see
vlmfast/runtime/layout.py): one program rotates BLOCK_ROWS rows; the (L, R/2) float32 tables are
read once per row and stay in L2. All arithmetic is float32; values are rounded to the output
dtype on store.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common
from vlmfast.kernels._common import INTERPRETING, to_dtype_of
from vlmfast.runtime import alloc as _alloc
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
    n_rows, L, M, E, HALF, sign,
    x_sa, x_sl, x_sm, o_sa, o_sl, o_sm,
    INTERLEAVED: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # sign: 1, or -1 for the conjugate rotation (the backward's). The pairs are taken BLOCK_HALF
    # at a time, so any R and E run on the few compiled tile widths.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    m, l, a = rows % M, (rows // M) % L, rows // (M * L)
    x_row = x_ptr + (a * x_sa + l * x_sl + m * x_sm)[:, None]
    o_row = out_ptr + (a * o_sa + l * o_sl + m * o_sm)[:, None]

    for i0 in range(0, HALF, BLOCK_HALF):
        i = i0 + tl.arange(0, BLOCK_HALF)
        mask = row_ok[:, None] & (i < HALF)[None, :]
        ia, ib = _pair_offsets(i, HALF, INTERLEAVED)
        xa = tl.load(x_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        table = l[:, None] * HALF + i[None, :]
        c = tl.load(cos_ptr + table, mask=mask, other=0.0)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0) * sign
        # out_a = x_a cos - x_b sin ; out_b = x_b cos + x_a sin
        tl.store(o_row + ia[None, :], to_dtype_of(xa * c - xb * s, out_ptr, ROUND_BF16), mask=mask)
        tl.store(o_row + ib[None, :], to_dtype_of(xb * c + xa * s, out_ptr, ROUND_BF16), mask=mask)

    # Head dims from R = 2 * HALF on are not rotated: copy them.
    for t0 in range(2 * HALF, E, BLOCK_HALF):
        t = t0 + tl.arange(0, BLOCK_HALF)
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
    for i0 in range(0, HALF, BLOCK_HALF):
        i = i0 + tl.arange(0, BLOCK_HALF)
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
    n_ok = n < N
    row = tl.load(pos_ptr + 2 * n, mask=n_ok, other=0).to(tl.float32)
    col = tl.load(pos_ptr + 2 * n + 1, mask=n_ok, other=0).to(tl.float32)
    for j0 in range(0, QUARTER, BLOCK_Q):
        j = j0 + tl.arange(0, BLOCK_Q)
        j_ok = j < QUARTER
        mask = n_ok[:, None] & j_ok[None, :]
        inv_freq = tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
        row_angle = row[:, None] * inv_freq[None, :]
        col_angle = col[:, None] * inv_freq[None, :]
        out = n[:, None] * (2 * QUARTER) + j[None, :]
        tl.store(cos_ptr + out, tl.cos(row_angle), mask=mask)
        tl.store(sin_ptr + out, tl.sin(row_angle), mask=mask)
        tl.store(cos_ptr + out + QUARTER, tl.cos(col_angle), mask=mask)
        tl.store(sin_ptr + out + QUARTER, tl.sin(col_angle), mask=mask)


# ----------------------------------------------------------------------------- configs

BLOCK_HALVES = (32, 64)  # pairs a program takes at a time (fewer lanes masked; wider tables loop)
ROPE_ROWS = 64  # positions per program of rope_2d


def block_half(half: int) -> int:
    return min(BLOCK_HALVES[-1], max(BLOCK_HALVES[0], triton.next_power_of_2(half)))


def rows_per_program(block: int) -> int:
    # About 2K pairs per program: enough bytes in flight per SM without spilling registers (4K
    # spilled the interleaved variant).
    return max(1, min(64, 2048 // block))


def table_rows(block: int) -> int:
    # Two float32 accumulators of (rows, pairs): about 2K pairs each.
    return max(1, min(32, 2048 // block))


def rows_grid(rows: int, per_program: int) -> tuple[int]:
    return (triton.cdiv(rows, per_program),)


def _types(dtype: torch.dtype) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    return {"x_ptr": data, "out_ptr": data, "grad_ptr": data, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "dcos_ptr": "*fp32", "dsin_ptr": "*fp32", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "sign": "fp32"}


def variants(target: str) -> list:
    """Every compile the launchers can ask for (the same on every target: no tile choice)."""
    out = []
    for dtype in _common.KERNEL_DTYPES:
        for block in BLOCK_HALVES:
            # Representative launch: x (A, L, M, E) = (2, 1024, 8 heads, E = 2 * BLOCK_HALF), contiguous.
            e = 2 * block
            ints = dict(n_rows=2 * 1024 * 8, L=1024, M=8, E=e, HALF=block, rows_per_l=16, x_sa=1024 * 8 * e,
                        x_sl=8 * e, x_sm=e, o_sa=1024 * 8 * e, o_sl=8 * e, o_sm=e, g_sa=1024 * 8 * e,
                        g_sl=8 * e, g_sm=e)
            for interleaved in (False, True):
                case = f"pairs<={block}" + " interleaved" * interleaved
                out.append(_common.Variant(_rotary_kernel, _types(dtype), dict(
                    INTERLEAVED=interleaved, ROUND_BF16=False, BLOCK_ROWS=rows_per_program(block),
                    BLOCK_HALF=block), {}, dtype, case=case, ints=ints))
                out.append(_common.Variant(_table_backward_kernel, _types(dtype), dict(
                    INTERLEAVED=interleaved, BLOCK_ROWS=table_rows(block), BLOCK_HALF=block), {}, dtype,
                    case=case, ints=ints))
    for block in BLOCK_HALVES:
        out.append(_common.Variant(_rope_2d_kernel, _types(torch.float32), dict(BLOCK_N=ROPE_ROWS, BLOCK_Q=block),
                                   {}, torch.float32, case=f"quarter<={block}", ints=dict(N=4096, QUARTER=block)))
    return out


# ----------------------------------------------------------------------------- launchers


def forward(x, cos, sin, interleaved: bool, conjugate: bool, seq_dim: int) -> torch.Tensor:
    record("rotary", "triton")
    out = _alloc.empty_like(x)
    x4, out4 = rows_view(x, seq_dim), rows_view(out, seq_dim)
    a, length, m, e = x4.shape
    half = cos.shape[-1]
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    block = block_half(half)
    per_program = rows_per_program(block)
    n_rows = a * length * m
    _common.launch(
        _rotary_kernel, rows_grid(n_rows, per_program),
        x4, cos32, sin32, out4, n_rows, length, m, e, half, -1.0 if conjugate else 1.0,
        *x4.stride()[:3], *out4.stride()[:3],
        INTERLEAVED=interleaved, ROUND_BF16=INTERPRETING, BLOCK_ROWS=per_program, BLOCK_HALF=block,
    )
    return out


def table_backward(grad, x, half: int, interleaved: bool, seq_dim: int):
    record("rotary_bwd", "triton")
    x4, grad4 = rows_view(x, seq_dim), rows_view(grad, seq_dim)
    a, length, m, _ = x4.shape
    grad_cos = _alloc.empty(length, half, dtype=torch.float32, device=x.device)
    grad_sin = _alloc.empty_like(grad_cos)
    block = block_half(half)
    _common.launch(
        _table_backward_kernel, (length,),
        grad4, x4, grad_cos, grad_sin, length, m, a * m, half,
        *x4.stride()[:3], *grad4.stride()[:3],
        INTERLEAVED=interleaved, BLOCK_ROWS=table_rows(block), BLOCK_HALF=block,
    )
    return grad_cos, grad_sin


def rope_2d(positions, inv_freq):
    record("rope_2d", "triton")
    positions = positions.to(torch.int64).contiguous()
    n, quarter = positions.shape[0], inv_freq.shape[0]
    cos = _alloc.empty(n, 2 * quarter, dtype=torch.float32, device=positions.device)
    sin = _alloc.empty_like(cos)
    _common.launch(
        _rope_2d_kernel, rows_grid(n, ROPE_ROWS),
        positions, inv_freq.contiguous(), cos, sin, n, quarter,
        BLOCK_N=ROPE_ROWS, BLOCK_Q=block_half(quarter),
    )
    return cos, sin
