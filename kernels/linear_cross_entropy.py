"""Triton kernels for the fused linear + cross-entropy, and their launchers.

hidden h (N, D), weight W (V, D) (row strides sh, sw, feature dim contiguous), logits
z_iv = h_i . W_v (+ b_v), formed tile by tile with tl.dot (fp32 accumulate).

- `_lse_partial_kernel`: program (row block, split) sweeps its split's SPAN vocabulary columns in
  BLOCK_N blocks (each a K-loop of tl.dot over D) keeping the online (max, sum of exp); it also
  picks the target logit and sums the logits (label smoothing). The splits spread the sweep over
  the GPU when N is small (N = 2048 is 32 row blocks for 132 SMs); the launcher combines the
  (4, splits, N) partials. Nothing of size V is stored.
- `_grad_logits_kernel`: for one vocabulary chunk [c0, c0 + C), one program per (BLOCK_M rows,
  BLOCK_N columns) recomputes the logit tile and writes G = s_i (exp(z - lse_i) - (1 - eps)
  [v == y_i] - eps / V) into an (N, C) chunk buffer in the GEMM dtype (the inputs' for 16-bit
  inputs, float32 otherwise). kernels/lce_chunks.py runs the chunk loop and its cuBLAS GEMMs
  d h += G W[chunk], d W[chunk] = G^T h (memory O(N D + V D + N C)); the backward of
  `grads_in_forward=False` and the sliced backward reuse the forward's lse.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common, lce_chunks
from vlmfast.kernels._common import INTERPRETING, mma, to_dtype_of
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # (BLOCK_M, BLOCK_N) fp32 logits h[rows] . W[cols] (+ b[cols]); rows/cols out of range read 0.
    # Row offsets in int64: rows * stride passes 2^31 for large N D or V D.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok, col_ok = rows < N, cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * sh
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * sw
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        ht = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mma(ht, tl.trans(wt), acc, PRECISION, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _lse_partial_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, N, V, D, sh, sw, SPAN,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # part (4, SPLITS, N) float32: running max, sum of exp(z - max), target logit, sum of logits
    # over this program's columns [split * SPAN, (split + 1) * SPAN).
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    v_start = split * SPAN
    v_end = tl.minimum(V, v_start + SPAN)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS, BLOCK_M,
                        BLOCK_N, BLOCK_K, PRECISION, INTERPRETED)
        # online log-sum-exp: s <- s e^(m - m') + sum_v e^(z_v - m'), m' the new running max
        z_live = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_live, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_live - m_new[:, None]), 1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        total += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
    plane = tl.num_programs(1).to(tl.int64) * N
    out = part_ptr + split.to(tl.int64) * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, target, mask=row_ok)
    tl.store(out + 3 * plane, total, mask=row_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, scale_ptr, g_ptr, N, V, D, sh, sw,
                        sg, c0, C, eps, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # column in the chunk
    cols = c0 + local
    row_ok, col_ok = rows < N, (local < C) & (cols < V)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, sh, sw, HAS_BIAS, BLOCK_M, BLOCK_N,
                    BLOCK_K, PRECISION, INTERPRETED)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    # G = s (softmax - (1 - eps) onehot - eps / V)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0 - eps, 0.0)
    g = scale[:, None] * (tl.exp(z - lse[:, None]) - onehot - eps / V)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    out = g_ptr + rows.to(tl.int64)[:, None] * sg + local[None, :]
    tl.store(out, to_dtype_of(g, g_ptr, INTERPRETED), mask=row_ok[:, None] & (local < C)[None, :])


# ----------------------------------------------------------------------------- configs

# Tile candidates per target and operand width; the first is the default, the rest are what
# VLMFAST_TUNE=1 times on a GPU. Kept to those that compile for the target without spills
# (python -m vlmfast.kernels.compile_all).
_TILES = {
    ("interpreter", "fp32"): [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)],
    ("interpreter", "16bit"): [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)],
    # About 32 float32 registers a thread per (BLOCK_M, BLOCK_N) tile: the log-sum-exp and the
    # gradient hold several such tiles (logits, exp, masks) beside the accumulator.
    ("sm_90", "fp32"): [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    ],
    ("sm_90", "16bit"): [
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    ],
    ("sm_80", "fp32"): [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    ],
    ("sm_80", "16bit"): [
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ],
}
KERNELS = ("_lse_partial_kernel", "_grad_logits_kernel")


def _width(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def tile_candidates(target: str, dtype: torch.dtype) -> list[dict]:
    return _TILES[(target, _width(dtype))]


def _types(dtype: torch.dtype) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    return {"h_ptr": data, "w_ptr": data, "b_ptr": "*fp32", "labels_ptr": "*i64", "part_ptr": "*fp32",
            "lse_ptr": "*fp32", "scale_ptr": "*fp32", "g_ptr": data, "eps": "fp32"}


def variants(target: str) -> list:
    """Every compile the launchers can ask for on `target` ("sm_90" / "sm_80")."""
    out = []
    for dtype in _common.KERNEL_DTYPES:
        for i, config in enumerate(tile_candidates(target, dtype)):
            for kernel in (_lse_partial_kernel, _grad_logits_kernel):
                out.append(_common.Variant(
                    kernel, _types(dtype),
                    dict(HAS_BIAS=True, PRECISION=_common.dot_precision(dtype), INTERPRETED=False,
                         **_common.tiles(config)),
                    _common.launch_options(config), dtype, default=i == 0, case="bias",
                    # N = 4096 rows, D = 2048, V = 32000, a 16384-column chunk
                    ints=dict(N=4096, V=32000, D=2048, sh=2048, sw=2048, SPAN=4096, sg=16384, c0=16384,
                              C=16384)))
    return out


def default_chunk(n: int, vocab: int) -> int:
    """Vocabulary columns per backward chunk: the (N, C) chunk of G near 2^26 elements."""
    return max(128, min(triton.next_power_of_2(vocab), (1 << 26) // max(n, 1) // 128 * 128))


def lse_split(n: int, vocab: int, block_m: int, block_n: int, programs: int) -> tuple[int, int]:
    """(splits, span): the vocabulary sweep cut into `splits` spans of `span` columns (a multiple
    of BLOCK_N, at least 4 blocks) so that row blocks x splits reach about `programs` programs."""
    row_blocks = triton.cdiv(max(n, 1), block_m)
    col_blocks = triton.cdiv(vocab, block_n)
    splits = max(1, min(triton.cdiv(programs, row_blocks), col_blocks // 4))
    span = triton.cdiv(col_blocks, splits) * block_n
    return triton.cdiv(vocab, span), span


def lse_grid(n: int, block_m: int, splits: int) -> tuple[int, int]:
    return (triton.cdiv(n, block_m), splits)


def grad_grid(n: int, width: int, block_m: int, block_n: int) -> tuple[int, int]:
    return (triton.cdiv(n, block_m), triton.cdiv(width, block_n))


# ----------------------------------------------------------------------------- launchers


def _prepare(hidden, weight, bias, labels):
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias32 = bias.float().contiguous() if bias is not None else None
    return hidden, weight, bias32, labels.contiguous()


def lse_pass(hidden, weight, bias, labels, splits: int | None = None):
    """(lse, target logit, sum of logits), float32 (N,) each; bias float32 or None."""
    (n, d), vocab = hidden.shape, weight.shape[0]
    device = hidden.device
    target = _common.target_of(device)
    key = (target, hidden.dtype, bias is not None)

    def run(config):
        nonlocal parts
        if splits is None:
            count, span = lse_split(n, vocab, config["BLOCK_M"], config["BLOCK_N"], 2 * _common.sm_count(device))
        else:
            span = triton.cdiv(triton.cdiv(vocab, splits), config["BLOCK_N"]) * config["BLOCK_N"]
            count = triton.cdiv(vocab, span)
        parts = _alloc.empty(4, count, n, dtype=torch.float32, device=device)
        return _common.launch(
            _lse_partial_kernel, lse_grid(n, config["BLOCK_M"], count),
            hidden, weight, bias if bias is not None else parts, labels, parts, n, vocab, d,
            hidden.stride(0), weight.stride(0), span, HAS_BIAS=bias is not None,
            PRECISION=_common.dot_precision(hidden.dtype), INTERPRETED=INTERPRETING, **config,
        )

    parts = None
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone(), empty.clone()
    config = _common.choose("lce_lse", key, tile_candidates(target, hidden.dtype), run)
    run(config)
    m, s, tgt, total = parts
    lse = torch.logsumexp(m + s.log(), 0) if m.shape[0] > 1 else m[0] + s[0].log()
    return lse, tgt.sum(0), total.sum(0)


def grad_logits_fn(hidden, weight, bias, labels, lse, scale, label_smoothing: float):
    """grad_logits(c0, width) -> G (N, width) for lce_chunks.backward, from the Triton kernel;
    bias float32 or None, scale float32 (N,) 0 on rows without a target."""
    (n, d), vocab = hidden.shape, weight.shape[0]
    g_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
    target = _common.target_of(hidden.device)
    key = (target, hidden.dtype, bias is not None)
    lse = lse.float().contiguous()
    buffer = {}

    def grad_logits(c0: int, width: int) -> torch.Tensor:
        if "g" not in buffer:  # one buffer for every chunk (the first is the widest)
            buffer["g"] = _alloc.empty(n, width, dtype=g_dtype, device=hidden.device)
        g = buffer["g"][:, :width]

        def run(config):
            return _common.launch(
                _grad_logits_kernel, grad_grid(n, width, config["BLOCK_M"], config["BLOCK_N"]),
                hidden, weight, bias if bias is not None else lse, labels, lse, scale, g, n, vocab, d,
                hidden.stride(0), weight.stride(0), buffer["g"].stride(0), c0, width, float(label_smoothing),
                HAS_BIAS=bias is not None, PRECISION=_common.dot_precision(hidden.dtype),
                INTERPRETED=INTERPRETING, **config,
            )

        if n:
            run(_common.choose("lce_grad", key, tile_candidates(target, hidden.dtype), run))
        return g

    return grad_logits


def _valid(labels, ignore_index: int, vocab: int):
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def backward(hidden, weight, bias, labels, lse, row_scale, ignore_index: int, label_smoothing: float,
             vocab_chunk: int | None = None, update=None):
    """(grad_hidden, grad_weight or None when `update` takes it in slices, grad_bias float32 or
    None) of sum_i row_scale_i loss_i, from the forward's lse (float32 (N,))."""
    record("linear_cross_entropy_bwd", "triton")
    hidden, weight, bias32, labels = _prepare(hidden, weight, bias, labels)
    n, vocab = hidden.shape[0], weight.shape[0]
    valid = _valid(labels, ignore_index, vocab)
    scale = torch.where(valid, row_scale.float(), torch.zeros((), device=hidden.device)).contiguous()
    grad_logits = grad_logits_fn(hidden, weight, bias32, labels, lse, scale, label_smoothing)
    chunk = vocab_chunk or default_chunk(n, vocab)
    return lce_chunks.backward(hidden, weight, bias32, chunk, grad_logits, update)


def forward(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, row_scale=None,
            vocab_chunk: int | None = None, lse_splits: int | None = None):
    """(loss_rows, lse, grad_hidden, grad_weight, grad_bias), as vlmfast.native's launcher;
    lse_splits: how many programs share a row block's vocabulary sweep (None: enough to fill the
    GPU; tests set it)."""
    record("linear_cross_entropy", "triton")
    hidden, weight, bias32, labels = _prepare(hidden, weight, bias, labels)
    vocab = weight.shape[0]
    lse, target, total = lse_pass(hidden, weight, bias32, labels, lse_splits)
    valid = _valid(labels, ignore_index, vocab)
    eps = float(label_smoothing)
    loss_rows = lse - (1.0 - eps) * target - eps / vocab * total
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    if row_scale is None:
        return loss_rows, lse, None, None, None
    grad_hidden, grad_weight, grad_bias = backward(hidden, weight, bias, labels, lse, row_scale, ignore_index,
                                                   label_smoothing, vocab_chunk)
    return loss_rows, lse, grad_hidden, grad_weight, grad_bias
