"""Triton kernels for the fused linear + cross-entropy, and their launcher.

hidden h (N, D), weight W (V, D) (row strides sh, sw, feature dim contiguous), logits
z_iv = h_i . W_v (+ b_v), formed tile by tile with tl.dot (fp32 accumulate).

- `_lse_kernel`: one program per BLOCK_M rows sweeps the vocabulary in BLOCK_N blocks (each a
  K-loop of tl.dot over D) keeping the online (max, sum of exp); it also picks the target logit
  and sums the logits (for label smoothing). Nothing of size V is stored: O(N) outputs.
- `_grad_logits_kernel`: for one vocabulary chunk [c0, c0 + C), one program per (BLOCK_M rows,
  BLOCK_N columns) recomputes the logit tile and writes G = s_i (exp(z - lse_i) - (1 - eps)
  [v == y_i] - eps / V) (float32) into a (N, C) chunk buffer. The launcher then adds
  d h += G W[chunk] and writes d W[chunk] = G^T h, d b[chunk] = sum_i G with torch.matmul
  (cuBLAS GEMMs; the chunk keeps the buffer at N * C floats: memory O(N D + V D + N C)).
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels._common import INTERPRETING
from vlmfast.runtime import alloc as _alloc


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    # a @ b + acc, fp32 accumulate. The interpreter's dot mis-multiplies bfloat16: it gets the
    # operands in float32 (exact for 16-bit values, the same products as the tensor cores).
    if INTERPRETING:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    # (BLOCK_M, BLOCK_N) fp32 logits h[rows] . W[cols] (+ b[cols]); rows/cols out of range read 0.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok, col_ok = rows < N, cols < V
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        ht = tl.load(h_ptr + rows[:, None] * sh + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * sw + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(ht, tl.trans(wt), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, target_ptr, total_ptr, N, V, D, sh, sw,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS, BLOCK_M,
                        BLOCK_N, BLOCK_K, PRECISION)
        # online log-sum-exp: s <- s e^(m - m') + sum_v e^(z_v - m'), m' the new running max
        z_live = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_live, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_live - m_new[:, None]), 1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        total += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_ok)
    tl.store(target_ptr + rows, target, mask=row_ok)
    tl.store(total_ptr + rows, total, mask=row_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, scale_ptr, g_ptr, N, V, D, sh, sw,
                        sg, c0, C, eps, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # column in the chunk
    cols = c0 + local
    row_ok, col_ok = rows < N, (local < C) & (cols < V)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS, BLOCK_M, BLOCK_N,
                    BLOCK_K, PRECISION)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    # G = s (softmax - (1 - eps) onehot - eps / V)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0 - eps, 0.0)
    g = scale[:, None] * (tl.exp(z - lse[:, None]) - onehot - eps / V)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    tl.store(g_ptr + rows[:, None] * sg + local[None, :], g, mask=row_ok[:, None] & (local < C)[None, :])


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs must not drop to TF32 (1e-5 relative is the contract)
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(dtype: torch.dtype) -> dict:
    if INTERPRETING:  # small tiles: the interpreter's cost grows with the tile
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if dtype != torch.float32 else 32)


def default_chunk(n: int, vocab: int) -> int:
    """Vocabulary columns per backward chunk: the (N, C) float32 buffer near 2^26 floats."""
    return max(128, min(triton.next_power_of_2(vocab), (1 << 26) // max(n, 1) // 128 * 128))


def forward(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, row_scale=None,
            vocab_chunk: int | None = None):
    """(loss_rows, lse, grad_hidden, grad_weight, grad_bias), as vlmfast.native's launcher."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    labels = labels.contiguous()
    (n, d), vocab = hidden.shape, weight.shape[0]
    device = hidden.device
    bias32 = bias.float().contiguous() if bias is not None else None
    b_arg = bias32 if bias32 is not None else hidden
    blocks = _blocks(hidden.dtype)
    common = dict(HAS_BIAS=bias is not None, PRECISION=_precision(hidden.dtype), **blocks)
    lse = _alloc.empty(n, dtype=torch.float32, device=device)
    target, total = _alloc.empty_like(lse), _alloc.empty_like(lse)
    if n:
        _lse_kernel[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            hidden, weight, b_arg, labels, lse, target, total, n, vocab, d, hidden.stride(0),
            weight.stride(0), **common,
        )
    valid = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
    eps = float(label_smoothing)
    loss_rows = lse - (1.0 - eps) * target - eps / vocab * total
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    if row_scale is None:
        return loss_rows, lse, None, None, None

    scale = torch.where(valid, row_scale.float(), torch.zeros_like(lse)).contiguous()
    chunk = vocab_chunk or default_chunk(n, vocab)
    grad_hidden = torch.zeros(n, d, dtype=torch.float32, device=device)
    grad_weight = _alloc.empty(vocab, d, dtype=weight.dtype, device=device)
    grad_bias = _alloc.empty(vocab, dtype=torch.float32, device=device) if bias is not None else None
    hidden32 = hidden.float()
    g = _alloc.empty(n, min(chunk, vocab), dtype=torch.float32, device=device)
    for c0 in range(0, vocab, chunk):
        width = min(chunk, vocab - c0)
        g_chunk = g[:, :width]
        if n:
            grid = (triton.cdiv(n, blocks["BLOCK_M"]), triton.cdiv(width, blocks["BLOCK_N"]))
            _grad_logits_kernel[grid](
                hidden, weight, b_arg, labels, lse, scale, g_chunk, n, vocab, d, hidden.stride(0),
                weight.stride(0), g.stride(0), c0, width, eps, **common,
            )
        else:
            g_chunk.zero_()
        # d h += G W[chunk]; d W[chunk] = G^T h; d b[chunk] = sum over rows of G
        grad_hidden.addmm_(g_chunk, weight[c0 : c0 + width].float())
        grad_weight[c0 : c0 + width] = (g_chunk.T @ hidden32).to(weight.dtype)
        if grad_bias is not None:
            grad_bias[c0 : c0 + width] = g_chunk.sum(0)
    return loss_rows, lse, grad_hidden.to(hidden.dtype), grad_weight, grad_bias
