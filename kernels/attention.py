"""Triton flash-attention kernels (forward, backward, varlen, split-KV decode) and their launchers.

Layouts (the last dim always has stride 1, every other stride is passed in):
    dense:  q (B, H, L, E), k/v (B, Hkv, S, E), out (B, H, L, E), lse (B, H, L) float32
    varlen: q (T, H, E), k/v (T, Hkv, E), out (T, H, E), lse (H, T) float32; sequence b covers
            packed rows [cu_seqlens[b], cu_seqlens[b + 1]) of q, k and v alike.
GQA: query head h reads kv head h // GROUP, GROUP = H // Hkv.
Bias: None or float32 (B, H, L, S) with any strides (an expanded key-padding mask has stride 0),
-inf where a key is masked out.

Every kernel works in the log2 domain: scores are scaled by scale * log2(e) so the softmax uses
exp2 (one MUFU op); lse is stored in the natural log. A row that can attend no key gets out = 0,
lse = -inf, and zero gradients.

Rotary (non-interleaved, tables (rows, R/2) float32) is applied in the forward to every q and k
tile on load (16-bit inputs, E <= 128): x_rot = x * cos + partner(x) * (-sin | +sin),
partner(d) = d +- R/2, a second (cached) load of the same rows. Elsewhere, and always in the
backward (whose kernels would spill registers holding the partner and table tiles), the launcher
rotates q and k with the rotary kernel first and turns dq, dk back with the conjugate rotation.

Head dims that are not powers of two (40, 72, 80) load BLOCK_E = next power of two columns with a
mask: nothing is padded in memory.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common
from vlmfast.kernels._common import INTERPRETING, to_dtype_of
from vlmfast.kernels._common import mma as _mma
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _rotary_parts(e, HALF):
    """For head-dim offsets e: the partner offset, the table column, the sign of sin, and
    whether the dim rotates at all (dims from R = 2 * HALF on pass through)."""
    first = e < HALF
    second = (e >= HALF) & (e < 2 * HALF)
    partner = tl.where(first, e + HALF, tl.where(second, e - HALF, e))
    column = tl.where(first, e, e - HALF)
    return partner, column, first, first | second


@triton.jit
def _load_tile(row_ptrs, rows, row_mask, e, e_ok, cos_ptr, sin_ptr, HALF, ROTARY: tl.constexpr,
               ROUND_BF16: tl.constexpr):
    """A (BLOCK, BLOCK_E) tile of rows `row_ptrs` (pointer per row) in their dtype; rotated by
    the table rows `rows` when ROTARY. Masked elements are 0."""
    mask = row_mask[:, None] & e_ok[None, :]
    x = tl.load(row_ptrs + e[None, :], mask=mask, other=0.0)
    if ROTARY:
        partner, column, first, rotates = _rotary_parts(e, HALF)
        rmask = row_mask[:, None] & rotates[None, :]
        xp = tl.load(row_ptrs + partner[None, :], mask=rmask, other=0.0).to(tl.float32)
        table = rows.to(tl.int64)[:, None] * HALF + column[None, :]
        c = tl.load(cos_ptr + table, mask=rmask, other=1.0)
        s = tl.load(sin_ptr + table, mask=rmask, other=0.0)
        # out_a = x_a cos - x_b sin ; out_b = x_b cos + x_a sin
        s = tl.where(first[None, :], -s, s)
        # Rounded to the input dtype, as apply_rotary_emb's output would be.
        return to_dtype_of(x.to(tl.float32) * c + xp * s, row_ptrs, ROUND_BF16)
    return x


@triton.jit
def _sequence(cu_ptr, b, L, S, VARLEN: tl.constexpr):
    """(first packed row, query length, key length) of sequence/batch entry b."""
    if VARLEN:
        start = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - start
        return start, length, length
    return b * 0, L, S


# ----------------------------------------------------------------------------- forward


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, v_ptr, SAFE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    """One online-softmax step over a key block: s (BLOCK_M, BLOCK_N) base-2 scores (-inf where
    masked), v (BLOCK_N, BLOCK_E) the block's values (v_ptr: their pointer, for the dtype of P).
    m_i running max, l_i running sum of exp2(s - m_i), acc running P @ V, all float32.
    SAFE: a row may have seen only -inf so far (bias, decode rows); subtract 0 for it instead
    of -inf (exp2(-inf) = 0, no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SAFE:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mma(to_dtype_of(p, v_ptr, ROUND_BF16), v, acc, DOT_PRECISION, ROUND_BF16)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, bias_rows, cos_ptr, sin_ptr,
    start, end, offs_m, m_ok, offs_n, offs_e, e_ok, seq_start, S, HALF,
    sks, svs, sbs, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROTARY: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # Online softmax over key blocks [start, end): m_i running max (log2 domain), l_i running
    # sum of exp2(s - m_i), acc running sum of P @ V, all float32.
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < S
        k_rows = k_base + n.to(tl.int64)[:, None] * sks
        k = _load_tile(k_rows, seq_start + n, n_ok, offs_e, e_ok, cos_ptr, sin_ptr, HALF, ROTARY, ROUND_BF16)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION, ROUND_BF16) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_rows + n.to(tl.int64)[None, :] * sbs, mask=m_ok[:, None] & n_ok[None, :],
                           other=float("-inf"))
            s += bias * 1.4426950408889634
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + n.to(tl.int64)[:, None] * svs + offs_e[None, :],
                    mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        # Only a bias can hide every key a row has seen so far (causal rows always see key 0).
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, v_base, HAS_BIAS, DOT_PRECISION,
                                      ROUND_BF16)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Cos, Sin, Out, Lse, CuSeqlens,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sob, soh, sol,
    sbb, sbh, sbl, sbs, slb, slh,
    H, GROUP, L, S, E, HALF, scale, M_BLOCKS,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch or sequence, head). A 1-D grid, query blocks
    # fastest (the programs of one head run together and share its K/V in L2); B * H on a
    # second axis would be limited to 65535.
    pid_m = tl.program_id(0) % M_BLOCKS
    pid_bh = tl.program_id(0) // M_BLOCKS
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # head offsets h * stride may pass 2**31
    hk = h // GROUP
    seq_start, L, S = _sequence(CuSeqlens, b, L, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m < L
    e_ok = offs_e < E

    q_rows = Q + b64 * sqb + h * sqh + (seq_start + offs_m).to(tl.int64)[:, None] * sql
    q = _load_tile(q_rows, seq_start + offs_m, m_ok, offs_e, e_ok, Cos, Sin, HALF, ROTARY, ROUND_BF16)
    k_base = K + b64 * skb + hk * skh + seq_start.to(tl.int64) * sks
    v_base = V + b64 * svb + hk * svh + seq_start.to(tl.int64) * svs
    bias_rows = Bias + b64 * sbb + h * sbh + offs_m.to(tl.int64)[:, None] * sbl

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634

    # Key blocks [0, full_end) need no mask: every key exists and (causal) every query of the
    # block may see it. Blocks [full_end, end) are masked; causal stops at the diagonal.
    if IS_CAUSAL:
        end = tl.minimum(S, m0 + BLOCK_M)
        full_end = (tl.minimum(S, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        end = S
        full_end = (S // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, bias_rows, Cos, Sin, 0, full_end, offs_m, m_ok,
        offs_n, offs_e, e_ok, seq_start, S, HALF, sks, svs, sbs, qk_scale,
        False, IS_CAUSAL, HAS_BIAS, ROTARY, BLOCK_N, DOT_PRECISION, ROUND_BF16)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, bias_rows, Cos, Sin, full_end, end, offs_m, m_ok,
        offs_n, offs_e, e_ok, seq_start, S, HALF, sks, svs, sbs, qk_scale,
        True, IS_CAUSAL, HAS_BIAS, ROTARY, BLOCK_N, DOT_PRECISION, ROUND_BF16)

    # A row with no key to attend has l_i = 0: out = 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_rows = Out + b64 * sob + h * soh + (seq_start + offs_m).to(tl.int64)[:, None] * sol
    tl.store(o_rows + offs_e[None, :], to_dtype_of(out, Out, ROUND_BF16),
             mask=m_ok[:, None] & e_ok[None, :])
    tl.store(Lse + b64 * slb + h * slh + seq_start + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- split-KV decode


@triton.jit
def _decode_split_kernel(
    Q, K, V, Bias, OutPart, LsePart,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sbb, sbh, sbl, sbs,
    H, GROUP, L, S, E, scale, CHUNK, NSPLIT,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # Flash-decoding: one program = one kv head of one batch entry x one chunk of CHUNK keys.
    # Its rows are the GROUP * L (query head, query) pairs that read this kv head, so the K/V
    # chunk is loaded once for the whole group. Partial results (normalised by their own sum)
    # and their log2-sum-exp go to float32 scratch (B, H, L, NSPLIT, E) and (B, H, L, NSPLIT).
    split = tl.program_id(0) % NSPLIT  # 1-D grid, splits fastest
    pid_bh = tl.program_id(0) // NSPLIT
    hkv = H // GROUP
    b = (pid_bh // hkv).to(tl.int64)
    hk = (pid_bh % hkv).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    r_ok = r < GROUP * L
    h = hk * GROUP + r // L
    i = r % L
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = Q + b * sqb + h.to(tl.int64)[:, None] * sqh + i.to(tl.int64)[:, None] * sql
    q = tl.load(q_rows + offs_e[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_rows = Bias + b * sbb + h.to(tl.int64)[:, None] * sbh + i.to(tl.int64)[:, None] * sbl
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(S, start + CHUNK)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        kv_mask = n_ok[:, None] & e_ok[None, :]
        k = tl.load(k_base + n.to(tl.int64)[:, None] * sks + offs_e[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION, ROUND_BF16) * qk_scale
        keep = n_ok[None, :] & r_ok[:, None]
        if HAS_BIAS:
            bias = tl.load(bias_rows + n.to(tl.int64)[None, :] * sbs, mask=keep, other=float("-inf"))
            s += bias * 1.4426950408889634
        if IS_CAUSAL:
            keep = keep & (n[None, :] <= i[:, None])
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + n.to(tl.int64)[:, None] * svs + offs_e[None, :], mask=kv_mask, other=0.0)
        # Padding rows (r >= GROUP * L) and a chunk past a causal row's diagonal see no key.
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, V, True, DOT_PRECISION, ROUND_BF16)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    row = ((b * H + h) * L + i).to(tl.int64) * NSPLIT + split  # (B, H, L, NSPLIT) flat
    tl.store(OutPart + row[:, None] * E + offs_e[None, :], acc / l_safe[:, None],
             mask=r_ok[:, None] & e_ok[None, :])
    tl.store(LsePart + row, lse2, mask=r_ok)


@triton.jit
def _decode_combine_kernel(
    OutPart, LsePart, Out, Lse, H, L, E, NSPLIT, sob, soh, sol,
    BLOCK_SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse): one program per query
    # row, the splits read BLOCK_SPLIT at a time with a running max (any NSPLIT, one compile).
    row = tl.program_id(0).to(tl.int64)  # (b, h, i) flat
    i = row % L
    h = (row // L) % H
    b = row // (L * H)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_E,), tl.float32)
    for s0 in range(0, NSPLIT, BLOCK_SPLIT):
        sp = s0 + tl.arange(0, BLOCK_SPLIT)
        sp_ok = sp < NSPLIT
        lse = tl.load(LsePart + row * NSPLIT + sp, mask=sp_ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        parts = tl.load(OutPart + (row * NSPLIT + sp)[:, None] * E + offs_e[None, :],
                        mask=sp_ok[:, None] & e_ok[None, :], other=0.0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total_safe = tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * sob + h * soh + i * sol + offs_e, to_dtype_of(acc / total_safe, Out, ROUND_BF16),
             mask=e_ok)
    lse_out = tl.where(total == 0.0, float("-inf"), (m_safe + tl.math.log2(total_safe)) * 0.6931471805599453)
    tl.store(Lse + row, lse_out)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta, CuSeqlens, sob, soh, sol, sdb, sdh, sdl, slb, slh, H, L, E, M_BLOCKS,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # D_i = rowsum(dO_i * O_i), float32, laid out like lse. 1-D grid, row blocks fastest.
    pid_m = tl.program_id(0) % M_BLOCKS
    pid_bh = tl.program_id(0) // M_BLOCKS
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # head offsets h * stride may pass 2**31
    seq_start, L, S = _sequence(CuSeqlens, b, L, L, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_m * BLOCK_M >= L:
        return
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_m < L)[:, None] & (offs_e < E)[None, :]
    rows = (seq_start + offs_m).to(tl.int64)[:, None]
    b64 = b.to(tl.int64)
    o = tl.load(Out + b64 * sob + h * soh + rows * sol + offs_e[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h * sdh + rows * sdl + offs_e[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * slb + h * slh + seq_start + offs_m, delta, mask=offs_m < L)


@triton.jit
def _load_lse2(Lse, offs, ok):
    # lse in log2; a row with no key (lse = -inf) becomes +inf so that exp2(s - lse) = 0.
    lse = tl.load(Lse + offs, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_cols,
    start, end, offs_n, n_ok, offs_m0, offs_e, e_ok, L,
    sql, sdl, sbl, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # Transposed tiles (keys x queries): dv += P^T dO ; dk += dS^T q, dS = P * (dP - D).
    for m0 in range(start, end, BLOCK_M):
        m = m0 + offs_m0
        m_ok = m < L
        q_rows = q_base + m.to(tl.int64)[:, None] * sql
        q = tl.load(q_rows + offs_e[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        lse2 = _load_lse2(lse_base, m, m_ok)
        s_t = _mma(k, tl.trans(q), None, DOT_PRECISION, ROUND_BF16) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_cols + m.to(tl.int64)[None, :] * sbl,
                           mask=n_ok[:, None] & m_ok[None, :], other=float("-inf"))
            s_t += bias * 1.4426950408889634
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            keep = m_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        do = tl.load(do_base + m.to(tl.int64)[:, None] * sdl + offs_e[None, :],
                     mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        dv = _mma(to_dtype_of(p_t, do_base, ROUND_BF16), do, dv, DOT_PRECISION, ROUND_BF16)
        dp_t = _mma(v, tl.trans(do), None, DOT_PRECISION, ROUND_BF16)
        delta = tl.load(delta_base + m, mask=m_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(to_dtype_of(ds_t, q_base, ROUND_BF16), q, dk, DOT_PRECISION, ROUND_BF16)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, CuSeqlens,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sdb, sdh, sdl,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sbb, sbh, sbl, sbs, slb, slh,
    H, GROUP, L, S, E, scale, N_BLOCKS,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # One program: BLOCK_N keys of one kv head, summed over the GROUP query heads that read it
    # (GQA without atomics), every query block that can see them.
    pid_n = tl.program_id(0) % N_BLOCKS  # 1-D grid, key blocks fastest
    pid_bh = tl.program_id(0) // N_BLOCKS
    hkv = H // GROUP
    b = pid_bh // hkv
    hk = (pid_bh % hkv).to(tl.int64)
    seq_start, L, S = _sequence(CuSeqlens, b, L, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= S:
        return
    b64 = b.to(tl.int64)
    start64 = seq_start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    n_ok = offs_n < S
    e_ok = offs_e < E
    kv_mask = n_ok[:, None] & e_ok[None, :]

    k_rows = K + b64 * skb + hk * skh + (seq_start + offs_n).to(tl.int64)[:, None] * sks
    k = tl.load(k_rows + offs_e[None, :], mask=kv_mask, other=0.0)
    v_rows = V + b64 * svb + hk * svh + (seq_start + offs_n).to(tl.int64)[:, None] * svs
    v = tl.load(v_rows + offs_e[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634

    # Query blocks: [m_start, mid) straddle the diagonal (causal mask), [mid, full_end) need no
    # mask, [full_end, L) hold the last partial block.
    if IS_CAUSAL:
        m_start = (n0 // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.cdiv(L, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, m_start)
    else:
        m_start = 0
        mid = 0
    full_end = tl.maximum(mid, (L // BLOCK_M) * BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * sqb + h * sqh + start64 * sql
        do_base = DO + b64 * sdb + h * sdh + start64 * sdl
        lse_base = Lse + b64 * slb + h * slh + seq_start
        delta_base = Delta + b64 * slb + h * slh + seq_start
        bias_cols = Bias + b64 * sbb + h * sbh + offs_n.to(tl.int64)[:, None] * sbs
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_cols,
            m_start, mid, offs_n, n_ok, offs_m0, offs_e, e_ok, L,
            sql, sdl, sbl, qk_scale, True, IS_CAUSAL, HAS_BIAS, BLOCK_M,
            DOT_PRECISION, ROUND_BF16)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_cols,
            mid, full_end, offs_n, n_ok, offs_m0, offs_e, e_ok, L,
            sql, sdl, sbl, qk_scale, False, IS_CAUSAL, HAS_BIAS, BLOCK_M,
            DOT_PRECISION, ROUND_BF16)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_cols,
            full_end, L, offs_n, n_ok, offs_m0, offs_e, e_ok, L,
            sql, sdl, sbl, qk_scale, True, IS_CAUSAL, HAS_BIAS, BLOCK_M,
            DOT_PRECISION, ROUND_BF16)

    dk = dk * scale  # dk = scale * dS^T q
    rows = (seq_start + offs_n).to(tl.int64)[:, None]
    tl.store(DK + b64 * sdkb + hk * sdkh + rows * sdks + offs_e[None, :],
             to_dtype_of(dk, DK, ROUND_BF16), mask=kv_mask)
    tl.store(DV + b64 * sdvb + hk * sdvh + rows * sdvs + offs_e[None, :],
             to_dtype_of(dv, DV, ROUND_BF16), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, bias_rows,
    start, end, offs_m, m_ok, offs_n0, offs_e, e_ok, S,
    sks, svs, sbs, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # dq += dS k, dS = P * (dP - D), dP = dO v^T.
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n0
        n_ok = n < S
        k_rows = k_base + n.to(tl.int64)[:, None] * sks
        k = tl.load(k_rows + offs_e[None, :], mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * svs + offs_e[None, :],
                    mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        s = _mma(q, tl.trans(k), None, DOT_PRECISION, ROUND_BF16) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_rows + n.to(tl.int64)[None, :] * sbs, mask=m_ok[:, None] & n_ok[None, :],
                           other=float("-inf"))
            s += bias * 1.4426950408889634
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = _mma(do, tl.trans(v), None, DOT_PRECISION, ROUND_BF16)
        ds = p * (dp - delta[:, None])
        dq = _mma(to_dtype_of(ds, v_base, ROUND_BF16), k, dq, DOT_PRECISION, ROUND_BF16)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuSeqlens,
    sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sdb, sdh, sdl,
    sdqb, sdqh, sdql, sbb, sbh, sbl, sbs, slb, slh,
    H, GROUP, L, S, E, scale, M_BLOCKS,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # One program: dq of BLOCK_M queries of one head (no atomics: it owns its rows). 1-D grid.
    pid_m = tl.program_id(0) % M_BLOCKS
    pid_bh = tl.program_id(0) // M_BLOCKS
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # head offsets h * stride may pass 2**31
    hk = h // GROUP
    seq_start, L, S = _sequence(CuSeqlens, b, L, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m < L
    e_ok = offs_e < E
    mask = m_ok[:, None] & e_ok[None, :]
    rows = (seq_start + offs_m).to(tl.int64)[:, None]

    q = tl.load(Q + b64 * sqb + h * sqh + rows * sql + offs_e[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h * sdh + rows * sdl + offs_e[None, :], mask=mask, other=0.0)
    lse2 = _load_lse2(Lse + b64 * slb + h * slh + seq_start, offs_m, m_ok)
    delta = tl.load(Delta + b64 * slb + h * slh + seq_start + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * skb + hk * skh + seq_start.to(tl.int64) * sks
    v_base = V + b64 * svb + hk * svh + seq_start.to(tl.int64) * svs
    bias_rows = Bias + b64 * sbb + h * sbh + offs_m.to(tl.int64)[:, None] * sbl
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)

    if IS_CAUSAL:
        end = tl.minimum(S, m0 + BLOCK_M)
        full_end = (tl.minimum(S, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        end = S
        full_end = (S // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_rows, 0, full_end,
                   offs_m, m_ok, offs_n0, offs_e, e_ok, S, sks, svs, sbs,
                   qk_scale, False, IS_CAUSAL, HAS_BIAS, BLOCK_N, DOT_PRECISION, ROUND_BF16)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_rows, full_end, end,
                   offs_m, m_ok, offs_n0, offs_e, e_ok, S, sks, svs, sbs,
                   qk_scale, True, IS_CAUSAL, HAS_BIAS, BLOCK_N, DOT_PRECISION, ROUND_BF16)
    dq = dq * scale  # dq = scale * dS k
    tl.store(DQ + b64 * sdqb + h * sdqh + rows * sdql + offs_e[None, :],
             to_dtype_of(dq, DQ, ROUND_BF16), mask=mask)


# ----------------------------------------------------------------------------- configs

BLOCK_ES = (16, 32, 64, 128, 256)  # the BLOCK_E of every head dim from 1 to 256
# Rotary is fused into the attention kernels for 16-bit inputs up to this BLOCK_E. Beyond, and
# for float32 (FMA dots), its partner and table tiles spill registers at any tile size: q and k
# are rotated by the rotary kernel first (one more pass over them) and dq, dk rotated back
# after the backward.
FUSED_ROTARY_MAX_E = 128
SHORT = 64  # queries of a "short" sequence (ViT-B/32: 50 tokens), which a 64-row tile wastes less of


def _block_e(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def fuses_rotary(block_e: int, dtype: torch.dtype) -> bool:
    return dtype != torch.float32 and block_e <= FUSED_ROTARY_MAX_E


def _tile(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


_INTERPRETER = [dict(BLOCK_M=16, BLOCK_N=16)]  # the interpreter's cost grows with the tile

# Tile tables: candidate configs per (target, problem class), the default first; the others are
# what VLMFAST_TUNE=1 times on a GPU. Every entry compiles for its target without register
# spills and within its shared memory (python -m vlmfast.kernels.compile_all checks it in CI).
# A bias holds one more float32 tile, rotary the partner tile and two float32 table tiles per
# streamed tile: both take narrower streamed tiles.


def forward_tiles(target: str, dtype: torch.dtype, block_e: int, short: bool, rotary: bool,
                  bias: bool) -> list[dict]:
    """Candidates for _fwd_kernel (BLOCK_M queries held, BLOCK_N keys streamed)."""
    rotary = rotary and fuses_rotary(block_e, dtype)
    if target == "interpreter":
        return _INTERPRETER
    if dtype == torch.float32:  # FMA dots ("ieee"): their operand layouts take small tiles
        if block_e <= 64:
            return [_tile(32, 32, 4, 2)]
        return [_tile(16, 32, 8, 2)] if block_e <= 128 else [_tile(16, 16, 8, 1)]
    if block_e <= 64 and short:
        return [_tile(64, 32 if rotary else 64, 4, 2 if rotary else 3)]
    if block_e <= 64:
        return [_tile(128, 32 if rotary else 64, 8, 2 if rotary else 3), _tile(64, 64, 4, 3)]
    if block_e <= 128 and target == "sm_80":  # Ampere's MMA holds its operands in registers
        return [_tile(128, 16, 8, 2)] if rotary else [_tile(128, 32, 8, 3)]
    if block_e <= 128:
        return [_tile(128, 32 if rotary or bias else 64, 8, 2 if rotary else 3)]
    return [_tile(64, 32 if bias else 64, 8, 2)]


def backward_tiles(target: str, dtype: torch.dtype, block_e: int, bias: bool) -> tuple[list[dict], list[dict]]:
    """(dk/dv candidates, dq candidates): the dk/dv kernel holds BLOCK_N keys, their float32 dk
    and dv and streams BLOCK_M queries; the dq kernel the other way round. (The backward never
    fuses rotary: the launcher rotates q and k first.)"""
    if target == "interpreter":
        return _INTERPRETER, _INTERPRETER
    if dtype == torch.float32:  # FMA dots: small tiles
        if block_e <= 64:
            return [_tile(16, 16, 8, 1)], [_tile(32, 32, 4, 2)]
        if block_e <= 128:
            return [_tile(16, 16, 8, 1)], [_tile(32, 16, 4, 2)]
        return [_tile(16, 16, 8, 1)], [_tile(16, 16, 4, 1)]
    ampere = target == "sm_80"  # Ampere's MMA holds its operands in registers: narrower dk/dv tiles
    if block_e <= 64:
        wide = not bias and not ampere
        return [_tile(32, 128 if wide else 32, 8, 3 if wide else 2)], [_tile(128, 32, 8, 3)]
    if block_e <= 128:
        return [_tile(32, 32, 8, 1 if bias else 2)], [_tile(64, 32 if bias else 64, 8, 2)]
    return [_tile(32, 16 if bias and ampere else 32, 8, 1)], [_tile(32 if bias else 64, 32, 8, 2)]


def decode_tiles(target: str, dtype: torch.dtype, block_e: int, rows: int) -> dict:
    """_decode_split_kernel's config for `rows` = GROUP * L query rows of a kv head (<= 64)."""
    block_m = 16 if rows <= 16 else DECODE_ROWS  # two row tiles: one compile each, not one per power of 2
    if target == "interpreter":
        return dict(BLOCK_M=block_m, BLOCK_N=16)
    if dtype == torch.float32:  # FMA dots
        return dict(BLOCK_M=block_m, BLOCK_N=32 if block_e <= 64 else 16, num_warps=8 if block_m == 64 else 4,
                    num_stages=2 if block_e <= 64 else 1)
    # E 256: 32-key tiles keep the K/V pipeline stages within shared memory; 64 rows take 8 warps
    # (4 spill registers).
    return dict(BLOCK_M=block_m, BLOCK_N=64 if block_e <= 128 else 32, num_warps=8 if block_m == 64 else 4,
                num_stages=3)


DECODE_ROWS = 64  # at most GROUP * L query rows in one decode tile
COMBINE_SPLITS = 16  # splits the combine kernel reads at a time
PREPROCESS_ROWS = {"interpreter": 16}  # rows per program of the backward's preprocessing (64 on a GPU)


def _preprocess_rows(target: str) -> int:
    return PREPROCESS_ROWS.get(target, 64)


def _bias_args(bias, device):
    """(tensor, strides) for the kernel; a 1-element dummy when there is no bias."""
    if bias is None:
        return torch.empty(1, dtype=torch.float32, device=device), (0, 0, 0, 0)
    return bias, tuple(bias.stride())


def _rotary_args(rotary, device):
    if rotary is None:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy, 0
    cos, sin = rotary
    return cos.float().contiguous(), sin.float().contiguous(), cos.shape[-1]


def blocks_grid(blocks: int, pairs: int) -> tuple[int]:
    """The 1-D grid of `blocks` row blocks for each of `pairs` (batch or sequence, head) pairs,
    row blocks fastest (axis 0 allows 2^31 - 1 programs; B * H = 65536 on axis 1 would not fit)."""
    return (blocks * pairs,)


# ----------------------------------------------------------------------------- compile variants


def _types(dtype: torch.dtype) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    types = {name: data for name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    types.update({name: "*fp32" for name in ("Bias", "Cos", "Sin", "Lse", "Delta", "OutPart", "LsePart")})
    types.update(CuSeqlens="*i32", scale="fp32")
    return types


def _sample_ints(block_e: int, varlen: bool) -> dict:
    """Integer arguments of a representative launch: contiguous (B, H, L, E) tensors (packed
    (T, H, E) for varlen), E = BLOCK_E, H = 8 query heads over 4 kv heads, L = S = 1024, a
    contiguous float32 (B, H, L, S) bias."""
    heads, length, e = 8, 1024, block_e
    batch, head, row = (0, e, heads * e) if varlen else (heads * length * e, length * e, e)
    ints = dict(H=heads, GROUP=2, L=0 if varlen else length, S=0 if varlen else length, E=e, HALF=e // 2,
                M_BLOCKS=16, N_BLOCKS=16, CHUNK=512, NSPLIT=2, sbb=heads * length * length,
                sbh=length * length, sbl=length, sbs=1, slb=0 if varlen else heads * length, slh=length)
    for t in ("q", "k", "v", "o", "d", "dk", "dv", "dq"):
        last = {"q": "l", "k": "s", "v": "s", "o": "l", "d": "l", "dk": "s", "dv": "s", "dq": "l"}[t]
        ints.update({f"s{t}b": batch, f"s{t}h": head, f"s{t}{last}": row})
    return ints


def variants(target: str) -> list:
    """Every compile the launchers can ask for on `target`: each (kernel, dtype, tile config) once,
    with the heaviest constexprs that lead to it (the largest BLOCK_E of its class, bias, rotary
    and causal on where they map there), plus a packed-sequence (VARLEN) variant of each kernel
    that has one."""
    chosen: dict = {}

    def add(kernel, dtype, config, default, flags, case, tag=""):
        key = (_common.kernel_name(kernel), dtype, tuple(sorted(config.items())), tag)
        weight = (flags.get("BLOCK_E", 0), flags.get("ROTARY", False), flags.get("HAS_BIAS", False),
                  flags.get("IS_CAUSAL", False), flags.get("BLOCK_M", 0))
        if key not in chosen or weight > chosen[key][0] or (default and not chosen[key][1].default):
            names = {name for name, _ in _common.kernel_params(kernel)}
            constexprs = {**flags, **_common.tiles(config)}
            if "DOT_PRECISION" in names:
                constexprs["DOT_PRECISION"] = _common.dot_precision(dtype)
            if "ROUND_BF16" in names:
                constexprs["ROUND_BF16"] = False
            ints = _sample_ints(flags.get("BLOCK_E", 64), flags.get("VARLEN", False))
            chosen[key] = (weight, _common.Variant(kernel, _types(dtype), constexprs,
                                                   _common.launch_options(config), dtype, default, case, ints))

    for dtype in _common.KERNEL_DTYPES:
        for block_e in BLOCK_ES:
            for rotary in (False, True) if fuses_rotary(block_e, dtype) else (False,):
                for bias in (False, True):
                    flags = dict(IS_CAUSAL=True, HAS_BIAS=bias, ROTARY=rotary, VARLEN=False, BLOCK_E=block_e)
                    case = f"E<={block_e}" + " rotary" * rotary + " bias" * bias
                    for short in (True, False):
                        for i, config in enumerate(forward_tiles(target, dtype, block_e, short, rotary, bias)):
                            add(_fwd_kernel, dtype, config, i == 0, flags, case + " short" * short)
                    if rotary:
                        continue  # the backward never fuses rotary
                    kv, dq = backward_tiles(target, dtype, block_e, bias)
                    backward_flags = dict(IS_CAUSAL=True, HAS_BIAS=bias, VARLEN=False, BLOCK_E=block_e)
                    for kernel, candidates in ((_dkdv_kernel, kv), (_dq_kernel, dq)):
                        for i, config in enumerate(candidates):
                            add(kernel, dtype, config, i == 0, backward_flags, case)
            for bias in (False, True):
                for rows in (16, DECODE_ROWS):
                    add(_decode_split_kernel, dtype, decode_tiles(target, dtype, block_e, rows), True,
                        dict(IS_CAUSAL=True, HAS_BIAS=bias, BLOCK_E=block_e), f"E<={block_e} rows<={rows}" + " bias" * bias)
            add(_decode_combine_kernel, dtype, dict(BLOCK_SPLIT=COMBINE_SPLITS), True, dict(BLOCK_E=block_e),
                f"E<={block_e}")
            add(_bwd_preprocess_kernel, dtype, dict(BLOCK_M=_preprocess_rows(target)), True,
                dict(VARLEN=True, BLOCK_E=block_e), f"E<={block_e}")
        # Packed sequences: the same tables; one compile per kernel proves the VARLEN path.
        rotary = fuses_rotary(64, dtype)
        flags = dict(IS_CAUSAL=True, HAS_BIAS=False, ROTARY=rotary, VARLEN=True, BLOCK_E=64)
        add(_fwd_kernel, dtype, forward_tiles(target, dtype, 64, False, rotary, False)[0], True, flags,
            "E<=64 varlen" + " rotary" * rotary, "varlen")
        kv, dq = backward_tiles(target, dtype, 64, False)
        flags = dict(IS_CAUSAL=True, HAS_BIAS=False, VARLEN=True, BLOCK_E=64)
        add(_dkdv_kernel, dtype, kv[0], True, flags, "E<=64 varlen", "varlen")
        add(_dq_kernel, dtype, dq[0], True, flags, "E<=64 varlen", "varlen")
    return [variant for _, variant in chosen.values()]


# ----------------------------------------------------------------------------- launchers


def use_decode(q: torch.Tensor, k: torch.Tensor, *, rotary, varlen: bool = False) -> bool:
    """Split-KV (flash-decoding) for a few queries against a longer KV cache: the regular
    kernel would pad each (batch, head) to a BLOCK_M-row tile and leave the GPU underfilled;
    the decode kernel packs the GROUP * L rows of a kv head into one small tile and splits the
    keys over programs instead."""
    if rotary is not None or varlen:
        return False
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    return (length <= 16 and group * length <= DECODE_ROWS
            and k.shape[2] >= 2 * _decode_block_n(q.shape[-1], q.device, q.dtype))


def _decode_block_n(head_dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    target = _common.target_of(device) if device is not None else ("interpreter" if INTERPRETING else "sm_90")
    return decode_tiles(target, dtype, _block_e(head_dim), 1)["BLOCK_N"]


def _rotate(x: torch.Tensor, rotary, seq_dim: int, conjugate: bool = False) -> torch.Tensor:
    """x rotated by the rotary kernel ("rotate half" pairs, tables (rows, R/2) along seq_dim)."""
    from vlmfast.kernels import rotary as triton_rotary

    cos, sin = rotary
    return triton_rotary.forward(x, cos, sin, False, conjugate, seq_dim)


def _launch_tuned(name: str, key: tuple, candidates: list[dict], run):
    return run(_common.choose(name, key, candidates, run))


def forward(q, k, v, *, scale: float, is_causal: bool, bias=None, rotary=None):
    """q (B, H, L, E), k/v (B, Hkv, S, E) -> out (B, H, L, E) contiguous, lse (B, H, L) float32.
    `rotary` = (cos, sin) of shape (L, R/2), applied to q and k (requires L == S)."""
    record("attention", "triton")
    if use_decode(q, k, rotary=rotary):
        return forward_decode(q, k, v, scale=scale, is_causal=is_causal, bias=bias)
    if rotary is not None and not fuses_rotary(_block_e(q.shape[-1]), q.dtype):
        q, k, rotary = _rotate(q, rotary, 2), _rotate(k, rotary, 2), None
    batch, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    out = _alloc.empty(batch, heads, length, head_dim, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    bias_t, bias_strides = _bias_args(bias, q.device)
    cos, sin, half = _rotary_args(rotary, q.device)
    target, block_e = _common.target_of(q.device), _block_e(head_dim)
    short, flags = length <= SHORT, (bool(is_causal), bias is not None, rotary is not None)

    def run(config):
        m_blocks = triton.cdiv(length, config["BLOCK_M"])
        return _common.launch(
            _fwd_kernel, blocks_grid(m_blocks, batch * heads),
            q, k, v, bias_t, cos, sin, out, lse, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *bias_strides, *lse.stride()[:2],
            heads, heads // kv_heads, length, keys, head_dim, half, float(scale), m_blocks,
            IS_CAUSAL=flags[0], HAS_BIAS=flags[1], ROTARY=flags[2], VARLEN=False, BLOCK_E=block_e,
            DOT_PRECISION=_common.dot_precision(q.dtype), ROUND_BF16=INTERPRETING, **config,
        )

    candidates = forward_tiles(target, q.dtype, block_e, short, rotary is not None, bias is not None)
    _launch_tuned("attention_fwd", (target, q.dtype, block_e, short, flags, triton.next_power_of_2(keys)),
                  candidates, run)
    return out, lse


def decode_split(keys: int, block_n: int, kv_pairs: int, programs: int) -> tuple[int, int]:
    """(splits, chunk): the keys cut into `splits` chunks of `chunk` keys (a multiple of
    BLOCK_N) so that splits x (batch, kv head) pairs reach about `programs` programs."""
    blocks = triton.cdiv(keys, block_n)
    splits = max(1, min(blocks, triton.cdiv(programs, kv_pairs)))
    chunk = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(keys, chunk), chunk


def forward_decode(q, k, v, *, scale: float, is_causal: bool, bias=None):
    """Flash-decoding: the same contract as forward(), for few queries and many keys."""
    batch, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_e = _block_e(head_dim)
    config = decode_tiles(_common.target_of(q.device), q.dtype, block_e, group * length)
    # About two programs per SM over all (batch, kv head, chunk).
    splits, chunk = decode_split(keys, config["BLOCK_N"], batch * kv_heads, 2 * _common.sm_count(q.device))
    out_part = _alloc.empty(batch, heads, length, splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = _alloc.empty(batch, heads, length, splits, dtype=torch.float32, device=q.device)
    out = _alloc.empty(batch, heads, length, head_dim, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    bias_t, bias_strides = _bias_args(bias, q.device)
    _common.launch(
        _decode_split_kernel, blocks_grid(splits, batch * kv_heads),
        q, k, v, bias_t, out_part, lse_part,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bias_strides,
        heads, group, length, keys, head_dim, float(scale), chunk, splits,
        IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, BLOCK_E=block_e,
        DOT_PRECISION=_common.dot_precision(q.dtype), ROUND_BF16=INTERPRETING, **config,
    )
    _common.launch(
        _decode_combine_kernel, (batch * heads * length,),
        out_part, lse_part, out, lse, heads, length, head_dim, splits, *out.stride()[:3],
        BLOCK_SPLIT=COMBINE_SPLITS, BLOCK_E=block_e, ROUND_BF16=INTERPRETING,
    )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, dq, dk, dv, *, scale, is_causal, bias,
              cu_seqlens, dense_shape, max_seqlen):
    """Shared launch of preprocess + dk/dv + dq for the dense and packed layouts (q, k already
    rotated). Tensors are given as (batch-like, head, row, E) strides through `dense_shape` =
    (nb, H, Hkv, L, S)."""
    nb, heads, kv_heads, length, keys = dense_shape
    head_dim = q.shape[-1]
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else lse
    strides = _strides4 if not varlen else _strides_packed
    delta = _alloc.empty_like(lse)
    target, block_e = _common.target_of(q.device), _block_e(head_dim)
    lse_strides = (0, lse.stride(0)) if varlen else lse.stride()[:2]
    rows = _preprocess_rows(target)
    m_blocks = triton.cdiv(max_seqlen, rows)
    _common.launch(
        _bwd_preprocess_kernel, blocks_grid(m_blocks, nb * heads),
        out, grad_out, delta, cu, *strides(out), *strides(grad_out), *lse_strides, heads,
        length, head_dim, m_blocks, VARLEN=varlen, BLOCK_M=rows, BLOCK_E=block_e,
    )
    bias_t, bias_strides = _bias_args(bias, q.device)
    kv_tiles, q_tiles = backward_tiles(target, q.dtype, block_e, bias is not None)
    common = dict(IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, VARLEN=varlen, BLOCK_E=block_e,
                  DOT_PRECISION=_common.dot_precision(q.dtype), ROUND_BF16=INTERPRETING)
    max_keys = max_seqlen if varlen else keys
    key = (target, q.dtype, block_e, bool(is_causal), bias is not None, varlen, triton.next_power_of_2(max_seqlen))

    def run_dkdv(config):
        n_blocks = triton.cdiv(max_keys, config["BLOCK_N"])
        return _common.launch(
            _dkdv_kernel, blocks_grid(n_blocks, nb * kv_heads),
            q, k, v, bias_t, grad_out, lse, delta, dk, dv, cu,
            *strides(q), *strides(k), *strides(v), *strides(grad_out), *strides(dk), *strides(dv),
            *bias_strides, *lse_strides, heads, heads // kv_heads, length, keys, head_dim,
            float(scale), n_blocks, **common, **config,
        )

    def run_dq(config):
        m_blocks = triton.cdiv(max_seqlen, config["BLOCK_M"])
        return _common.launch(
            _dq_kernel, blocks_grid(m_blocks, nb * heads),
            q, k, v, bias_t, grad_out, lse, delta, dq, cu,
            *strides(q), *strides(k), *strides(v), *strides(grad_out), *strides(dq),
            *bias_strides, *lse_strides, heads, heads // kv_heads, length, keys, head_dim,
            float(scale), m_blocks, **common, **config,
        )

    _launch_tuned("attention_dkdv", key, kv_tiles, run_dkdv)
    _launch_tuned("attention_dq", key, q_tiles, run_dq)


def _strides4(t):
    # (B, H, L, E): batch, head, row strides.
    return t.stride()[:3]


def _strides_packed(t):
    # (T, H, E): no batch stride (rows are offset by cu_seqlens), head, row strides.
    return 0, t.stride(1), t.stride(0)


def backward(grad_out, q, k, v, out, lse, *, scale: float, is_causal: bool, bias=None, rotary=None):
    """(dq, dk, dv) like (q, k, v) for the forward above; dk, dv summed over each GQA group."""
    record("attention_bwd", "triton")
    batch, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    dq = _alloc.empty_like(q)
    dk = _alloc.empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc.empty(*v.shape, dtype=v.dtype, device=v.device)
    if length == 0 or keys == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if rotary is not None:  # the backward works on rotated q, k (see backward_tiles)
        q, k = _rotate(q, rotary, 2), _rotate(k, rotary, 2)
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale=scale, is_causal=is_causal,
              bias=bias, cu_seqlens=None, dense_shape=(batch, heads, kv_heads, length, keys),
              max_seqlen=length)
    if rotary is not None:  # gradients of the rotated q, k -> of q, k: the inverse (conjugate) rotation
        return _rotate(dq, rotary, 2, conjugate=True), _rotate(dk, rotary, 2, conjugate=True), dv
    return dq, dk, dv


def forward_varlen(q, k, v, cu_seqlens, max_seqlen: int, *, scale: float, is_causal: bool, rotary=None):
    """q (T, H, E), k/v (T, Hkv, E), cu_seqlens int32 (n + 1,) -> out (T, H, E), lse (H, T)."""
    record("attention_varlen", "triton")
    total, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    out = _alloc.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(heads, total, dtype=torch.float32, device=q.device)
    if total == 0 or n_seq == 0 or max_seqlen == 0:
        return out, lse
    if rotary is not None and not fuses_rotary(_block_e(head_dim), q.dtype):
        q, k, rotary = _rotate(q, rotary, 0), _rotate(k, rotary, 0), None
    bias_t, _ = _bias_args(None, q.device)
    cos, sin, half = _rotary_args(rotary, q.device)
    target, block_e = _common.target_of(q.device), _block_e(head_dim)
    short = max_seqlen <= SHORT

    def run(config):
        m_blocks = triton.cdiv(max_seqlen, config["BLOCK_M"])
        return _common.launch(
            _fwd_kernel, blocks_grid(m_blocks, n_seq * heads),
            q, k, v, bias_t, cos, sin, out, lse, cu_seqlens,
            *_strides_packed(q), *_strides_packed(k), *_strides_packed(v), *_strides_packed(out),
            0, 0, 0, 0, 0, lse.stride(0),
            heads, heads // kv_heads, 0, 0, head_dim, half, float(scale), m_blocks,
            IS_CAUSAL=bool(is_causal), HAS_BIAS=False, ROTARY=rotary is not None, VARLEN=True,
            BLOCK_E=block_e, DOT_PRECISION=_common.dot_precision(q.dtype),
            ROUND_BF16=INTERPRETING, **config,
        )

    candidates = forward_tiles(target, q.dtype, block_e, short, rotary is not None, False)
    key = (target, q.dtype, block_e, short, (bool(is_causal), False, rotary is not None), "varlen",
           triton.next_power_of_2(max_seqlen))
    _launch_tuned("attention_fwd", key, candidates, run)
    return out, lse


def backward_varlen(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, *, scale: float,
                    is_causal: bool, rotary=None):
    """(dq, dk, dv) of forward_varlen, packed like q, k, v."""
    record("attention_varlen_bwd", "triton")
    total, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    dq = _alloc.empty_like(q)
    dk = _alloc.empty_like(k)
    dv = _alloc.empty_like(v)
    if total == 0 or n_seq == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if rotary is not None:
        q, k = _rotate(q, rotary, 0), _rotate(k, rotary, 0)
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale=scale, is_causal=is_causal,
              bias=None, cu_seqlens=cu_seqlens, dense_shape=(n_seq, heads, kv_heads, 0, 0),
              max_seqlen=max_seqlen)
    if rotary is not None:
        return _rotate(dq, rotary, 0, conjugate=True), _rotate(dk, rotary, 0, conjugate=True), dv
    return dq, dk, dv


def flops(batch: int, heads: int, length: int, keys: int, head_dim: int, backward: bool = False) -> float:
    """4 B H L S E for the forward (two GEMMs), 2.5x that for the backward (five)."""
    forward_flops = 4.0 * batch * heads * length * keys * head_dim
    return forward_flops * (2.5 if backward else 1.0)

