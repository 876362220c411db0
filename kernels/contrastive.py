"""Triton kernels for the contrastive losses (InfoNCE, SigLIP), and their launchers.

x, y are (B, D) feature matrices (row strides sx, sy, feature dim contiguous); logits
l_ij = s x_i . y_j (+ t). Tiles of logits are formed on the fly with tl.dot (fp32 accumulate) and
never stored, so memory is O(B).

- `_row_lse_kernel`: one program per BLOCK_M rows sweeps all columns keeping the online
  (max, sum of exp): R_i = logsumexp_j l_ij. The column log-sum-exps are the row ones of the
  transposed problem, so the launcher calls the same kernel with x and y swapped.
- `_siglip_rows_kernel`: per row, sum_j softplus(-y_ij l_ij) (y = 2I - 1).
- `_row_grad_kernel`: one program per (BLOCK_M rows, BLOCK_DO feature columns) recomputes the
  logit tiles, forms G_ij = g dloss/dl_ij and accumulates d x_i = s sum_j G_ij y_j with tl.dot.
  G is symmetric in the roles of x and y for both losses (InfoNCE: coef (exp(l - R_i) +
  exp(l - C_j)) - 2 coef [i == j]; SigLIP: coef (sigmoid(l) - [i == j])), so d y is the same
  kernel with x, y (and R, C) swapped. Per row it also writes sum_j G_ij (x_i . y_j) and
  sum_j G_ij, whose totals are d s and d t.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common
from vlmfast.kernels._common import INTERPRETING, _round_to_bfloat16, to_dtype_of
from vlmfast.kernels._common import mma as _mma
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record


@triton.jit
def _dot_tile(x_ptr, y_ptr, rows, cols, D, sx, sy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # (BLOCK_M, BLOCK_N) fp32 dots x[rows] . y[cols]; rows/cols past B load as zeros.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        xt = tl.load(x_ptr + rows[:, None] * sx + k[None, :], mask=k_ok[None, :], other=0.0)
        yt = tl.load(y_ptr + cols[:, None] * sy + k[None, :], mask=k_ok[None, :], other=0.0)
        acc = _mma(xt, tl.trans(yt), acc, PRECISION, INTERPRETED)
    return acc


@triton.jit
def _log1p_unit(e):
    # log(1 + e) for e in [0, 1] as 2 atanh(e / (2 + e)): accurate for tiny e too.
    u = e / (2.0 + e)
    u2 = u * u
    p = 1.0 / 15.0
    p = p * u2 + 1.0 / 13.0
    p = p * u2 + 1.0 / 11.0
    p = p * u2 + 1.0 / 9.0
    p = p * u2 + 1.0 / 7.0
    p = p * u2 + 1.0 / 5.0
    p = p * u2 + 1.0 / 3.0
    p = p * u2 + 1.0
    return 2.0 * u * p


@triton.jit
def _row_lse_kernel(
    x_ptr, y_ptr, scale_ptr, lse_ptr, term_ptr, B, D, sx, sy,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past B read row B - 1 (clamped) so their loads need no mask; they are not stored.
    safe_rows = tl.minimum(rows, B - 1)
    scale = tl.load(scale_ptr).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dots = _dot_tile(x_ptr, y_ptr, safe_rows, tl.minimum(cols, B - 1), D, sx, sy,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, INTERPRETED)
        logits = tl.where((cols < B)[None, :], dots * scale, float("-inf"))
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], logits, 0.0), 1)
        # Online log-sum-exp: rescale the running sum to the new max.
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rows < B)
    # The row's loss term R_i - l_ii, formed before R_i is rounded: l_ii and the max come from
    # the same tile values, so it stays accurate when the loss is near 0 (R_i ~ l_ii ~ scale).
    tl.store(term_ptr + rows, (m - diag) + tl.log(s), mask=rows < B)


@triton.jit
def _siglip_rows_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, out_ptr, B, D, sx, sy,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    safe_rows = tl.minimum(rows, B - 1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dots = _dot_tile(x_ptr, y_ptr, safe_rows, tl.minimum(cols, B - 1), D, sx, sy,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, INTERPRETED)
        logits = dots * scale + bias
        # -logsigmoid(y l) = softplus(-y l); y = +1 on the diagonal, -1 elsewhere.
        z = tl.where(rows[:, None] == cols[None, :], -logits, logits)
        term = tl.maximum(z, 0.0) + _log1p_unit(tl.exp(-tl.abs(z)))
        total += tl.sum(tl.where((cols < B)[None, :], term, 0.0), 1)
    tl.store(out_ptr + rows, total, mask=rows < B)


@triton.jit
def _row_grad_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, grad_ptr, lse_x_ptr, lse_y_ptr, dx_ptr, gdot_ptr, gsum_ptr,
    B, D, sx, sy, inv_norm,
    SIGLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    safe_rows = tl.minimum(rows, B - 1)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    scale = tl.load(scale_ptr).to(tl.float32)
    # coef = g / (2B) (InfoNCE) or g / B (SigLIP): inv_norm is 1 / (2B) or 1 / B.
    coef = tl.load(grad_ptr).to(tl.float32) * inv_norm
    if SIGLIP:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        lse_x = tl.load(lse_x_ptr + safe_rows)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    gdot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < B
        safe_cols = tl.minimum(cols, B - 1)
        dots = _dot_tile(x_ptr, y_ptr, safe_rows, safe_cols, D, sx, sy,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, INTERPRETED)
        diagonal = rows[:, None] == cols[None, :]
        if SIGLIP:
            # d loss / d l_ij = (sigmoid(l_ij) - [i == j]) / B
            g = coef * (tl.sigmoid(dots * scale + bias) - tl.where(diagonal, 1.0, 0.0))
        else:
            # d loss / d l_ij = (exp(l_ij - R_i) + exp(l_ij - C_j) - 2 [i == j]) / (2B)
            logits = dots * scale
            lse_y = tl.load(lse_y_ptr + safe_cols)
            g = coef * (tl.exp(logits - lse_x[:, None]) + tl.exp(logits - lse_y[None, :])
                        - tl.where(diagonal, 2.0, 0.0))
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        gdot += tl.sum(g * dots, 1)
        gsum += tl.sum(g, 1)
        # d x_i += sum_j G_ij y_j over this program's feature columns
        yd = tl.load(y_ptr + safe_cols[:, None] * sy + d_out[None, :], mask=d_ok[None, :], other=0.0)
        # G enters the MMA in the features' dtype (bf16/fp16 tensor cores on a GPU), rounded
        # to nearest (by hand under the interpreter, whose cast truncates).
        if INTERPRETED and yd.dtype == tl.bfloat16:
            g_op = _round_to_bfloat16(g)
        else:
            g_op = g.to(yd.dtype)
        acc = _mma(g_op, yd, acc, PRECISION, INTERPRETED)
    out = dx_ptr + rows[:, None] * D + d_out[None, :]
    tl.store(out, to_dtype_of(acc * scale, dx_ptr, INTERPRETED), mask=row_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(gdot_ptr + rows, gdot, mask=row_ok)
        tl.store(gsum_ptr + rows, gsum, mask=row_ok)


# ----------------------------------------------------------------------------- launchers


# Tile candidates per target and operand width, the default first (VLMFAST_TUNE=1 times the
# rest on a GPU). The forward holds a (BLOCK_M, BLOCK_N) logit tile; the backward also a
# (BLOCK_M, BLOCK_DO) float32 accumulator over BLOCK_DO feature columns (D = 512: two programs
# per row block, each recomputing the logits). Each compiles without spills (compile_all).
_FORWARD = {
    "sm_90": {"fp32": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)],
              "16bit": [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)]},
    "sm_80": {"fp32": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)],
              "16bit": [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)]},
}
_GRAD = {
    "sm_90": {"fp32": [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2)],
              "16bit": [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=2)]},
    "sm_80": {"fp32": [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2)],
              "16bit": [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=2)]},
}
BLOCK_DOS = (64, 256)  # feature columns of dx per program on a GPU (D = 128 takes the 256 tile, masked)


def _width(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def block_do(d: int) -> int:
    return next((b for b in BLOCK_DOS if d <= b), BLOCK_DOS[-1])


def forward_tiles(target: str, dtype: torch.dtype, d: int) -> list[dict]:
    if target == "interpreter":  # small tiles: the interpreter runs them in numpy
        return [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=max(16, min(64, triton.next_power_of_2(d))))]
    return _FORWARD[target][_width(dtype)]


def grad_tiles(target: str, dtype: torch.dtype, d: int) -> list[dict]:
    if target == "interpreter":
        return [dict(forward_tiles(target, dtype, d)[0], BLOCK_DO=max(16, min(64, triton.next_power_of_2(d))))]
    return [dict(config, BLOCK_DO=block_do(d)) for config in _GRAD[target][_width(dtype)]]


def rows_grid(b: int, block_m: int) -> tuple[int]:
    return (triton.cdiv(b, block_m),)


def grad_grid(b: int, d: int, block_m: int, block_do_: int) -> tuple[int, int]:
    return (triton.cdiv(b, block_m), triton.cdiv(d, block_do_))


def _common_constexprs(x: torch.Tensor) -> dict:
    return dict(PRECISION=_common.dot_precision(x.dtype), INTERPRETED=INTERPRETING)


def _types(dtype: torch.dtype) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    types = {name: "*fp32" for name in ("scale_ptr", "bias_ptr", "grad_ptr", "lse_ptr", "term_ptr", "out_ptr",
                                        "lse_x_ptr", "lse_y_ptr", "gdot_ptr", "gsum_ptr")}
    types.update(x_ptr=data, y_ptr=data, dx_ptr=data, inv_norm="fp32")
    return types


def variants(target: str) -> list:
    """Every compile the launchers can ask for on `target` (representative launch: B = 4096
    rows of D = 768 features, contiguous)."""
    ints = dict(B=4096, D=768, sx=768, sy=768)
    out = []
    for dtype in _common.KERNEL_DTYPES:
        flags = dict(PRECISION=_common.dot_precision(dtype), INTERPRETED=False)
        for i, config in enumerate(forward_tiles(target, dtype, 512)):
            for kernel in (_row_lse_kernel, _siglip_rows_kernel):
                out.append(_common.Variant(kernel, _types(dtype), dict(flags, **_common.tiles(config)),
                                           _common.launch_options(config), dtype, i == 0, "forward", ints))
        for d in BLOCK_DOS:
            for i, config in enumerate(grad_tiles(target, dtype, d)):
                for siglip in (False, True):
                    out.append(_common.Variant(
                        _row_grad_kernel, _types(dtype), dict(flags, SIGLIP=siglip, **_common.tiles(config)),
                        _common.launch_options(config), dtype, i == 0,
                        f"D<={d} " + ("siglip" if siglip else "infonce"), ints))
    return out


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_lse(x, y, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R - diag): the row log-sum-exps of scale * x @ y.T and the rows' loss terms."""
    B, D = x.shape
    lse = _alloc.empty(B, dtype=torch.float32, device=x.device)
    term = _alloc.empty_like(lse)
    target = _common.target_of(x.device)

    def run(config):
        return _common.launch(_row_lse_kernel, rows_grid(B, config["BLOCK_M"]), x, y, scale, lse, term, B, D,
                              x.stride(0), y.stride(0), **_common_constexprs(x), **config)

    run(_common.choose("infonce_rows", (target, x.dtype, triton.next_power_of_2(B)),
                       forward_tiles(target, x.dtype, D), run))
    return lse, term


def _scale32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1).to(torch.float32).contiguous()


def infonce_forward(a, b, scale):
    """(loss, row_lse, col_lse): float32 (), (B,), (B,). The column pass is the row pass of b a^T."""
    record("infonce", "triton")
    a, b = _prepare(a), _prepare(b)
    s = _scale32(scale)
    row_lse, row_term = _row_lse(a, b, s)
    col_lse, col_term = _row_lse(b, a, s)
    loss = (row_term.sum() + col_term.sum()) / (2 * a.shape[0])
    return loss, row_lse, col_lse


def siglip_forward(a, b, scale, bias):
    """The loss, float32 ()."""
    record("siglip", "triton")
    a, b = _prepare(a), _prepare(b)
    B, D = a.shape
    rows = _alloc.empty(B, dtype=torch.float32, device=a.device)
    target = _common.target_of(a.device)
    s, t = _scale32(scale), _scale32(bias)

    def run(config):
        return _common.launch(_siglip_rows_kernel, rows_grid(B, config["BLOCK_M"]), a, b, s, t, rows, B, D,
                              a.stride(0), b.stride(0), **_common_constexprs(a), **config)

    run(_common.choose("siglip_rows", (target, a.dtype, triton.next_power_of_2(B)),
                       forward_tiles(target, a.dtype, D), run))
    return rows.sum() / B


def _row_grad(x, y, scale, bias, grad, lse_x, lse_y, siglip: bool):
    B, D = x.shape
    dx = _alloc.empty(B, D, dtype=x.dtype, device=x.device)
    gdot = _alloc.empty(B, dtype=torch.float32, device=x.device)
    gsum = _alloc.empty_like(gdot)
    target = _common.target_of(x.device)

    def run(config):
        return _common.launch(
            _row_grad_kernel, grad_grid(B, D, config["BLOCK_M"], config["BLOCK_DO"]),
            x, y, scale, bias, grad, lse_x, lse_y, dx, gdot, gsum, B, D, x.stride(0), y.stride(0),
            1.0 / B if siglip else 0.5 / B, SIGLIP=siglip, **_common_constexprs(x), **config,
        )

    run(_common.choose("contrastive_grad", (target, x.dtype, siglip, triton.next_power_of_2(B)),
                       grad_tiles(target, x.dtype, D), run))
    return dx, gdot, gsum


def infonce_backward(grad, a, b, scale, row_lse, col_lse):
    """(grad_a, grad_b, grad_scale): (B, D) in a's dtype twice, float32 ()."""
    record("infonce_bwd", "triton")
    a, b = _prepare(a), _prepare(b)
    s, g = _scale32(scale), _scale32(grad)
    row_lse, col_lse = row_lse.contiguous(), col_lse.contiguous()
    grad_a, gdot, _ = _row_grad(a, b, s, s, g, row_lse, col_lse, siglip=False)
    grad_b, _, _ = _row_grad(b, a, s, s, g, col_lse, row_lse, siglip=False)
    return grad_a, grad_b, gdot.sum()


def siglip_backward(grad, a, b, scale, bias):
    """(grad_a, grad_b, grad_scale, grad_bias): (B, D) in a's dtype twice, float32 () twice."""
    record("siglip_bwd", "triton")
    a, b = _prepare(a), _prepare(b)
    s, t, g = _scale32(scale), _scale32(bias), _scale32(grad)
    grad_a, gdot, gsum = _row_grad(a, b, s, t, g, s, s, siglip=True)
    grad_b, _, _ = _row_grad(b, a, s, t, g, s, s, siglip=True)
    return grad_a, grad_b, gdot.sum(), gsum.sum()
