// The two products of the CPU attention (csrc/cpu/attention.cpp) on bfloat16 pairs, for
// bfloat16 inputs on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 pairs per instruction, twice
// the multiply-adds of a float32 FMA, so the score tile and the P V update run at the rate of
// the bf16 GEMM instead of the float32 one. The softmax between them stays in float32; P is
// rounded to bfloat16 for the second product, as flash-attention and torch's CPU kernel do for
// low-precision inputs (its row sums are taken before the rounding).
//
// Layouts (a "pair" is two bfloat16 in one 32-bit word, the lower-addressed one in the low half):
//   rows (q, dO): pair p of row r at q[r * q_stride + p] (the head dim padded to `width` with 0);
//   "pairs of the head dim per key" (K, and V for dP = dO V^T): pair p of key j at kp[p * 64 + j];
//   "pairs of keys (or of query rows) per element" (V for P V, K for dS K; q and dO for the
//     backward's sums over rows): rows 2i and 2i + 1 of element e at vp[i * width + e];
//   P and dS: (rows, 64) float tiles, rounded to pairs along keys or along rows here.
// The backward rounds dS too (as flash-attention's does); its sums stay float32.
#pragma once

#include <cstdint>

#include "cpu/gemm_kernels.h"

#if VLMFAST_GEMM_X86
namespace vlmfast::cpu::attention_pairs {

constexpr int kKeys = 64;   // keys per tile (attention.cpp: kKeyBlock)
constexpr int kLanes = 16;

// S[r][16 c + i] = mult * sum_p q(r, p) . k(16 c + i, p) for the first V vectors of keys.
template <int R, int V>
VLMFAST_TARGET_AVX512BF16 inline void score_rows(const uint32_t* q, int64_t q_stride, const uint32_t* kp,
                                                 int64_t pairs, float mult, float* S) {
  __m512 acc[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh k[V];
#pragma GCC unroll 4
    for (int c = 0; c < V; ++c) k[c] = (__m512bh)_mm512_load_si512(kp + p * kKeys + c * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * q_stride + p]));
#pragma GCC unroll 4
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, k[c]);
    }
  }
  const __m512 m = _mm512_set1_ps(mult);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < V; ++c) _mm512_store_ps(S + r * kKeys + c * kLanes, _mm512_mul_ps(acc[r][c], m));
}

template <int V>
VLMFAST_TARGET_AVX512BF16 inline void score_columns(const uint32_t* q, int64_t q_stride, const uint32_t* kp,
                                                    int64_t pairs, float mult, float* S, int64_t rows) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) score_rows<6, V>(q + r * q_stride, q_stride, kp, pairs, mult, S + r * kKeys);
  const uint32_t* qr = q + r * q_stride;
  float* s = S + r * kKeys;
  switch (rows - r) {
    case 5: score_rows<5, V>(qr, q_stride, kp, pairs, mult, s); break;
    case 4: score_rows<4, V>(qr, q_stride, kp, pairs, mult, s); break;
    case 3: score_rows<3, V>(qr, q_stride, kp, pairs, mult, s); break;
    case 2: score_rows<2, V>(qr, q_stride, kp, pairs, mult, s); break;
    case 1: score_rows<1, V>(qr, q_stride, kp, pairs, mult, s); break;
    default: break;
  }
}

// The (rows, 64) score tile S = mult * q k^T over `pairs` pairs of the head dim; only the first
// `keys` columns (rounded up to a vector) are computed, the rest left for the caller's mask.
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void tile_scores(
    const uint32_t* q, int64_t q_stride, const uint32_t* kp, int64_t pairs, float mult, float* S,
    int64_t rows, int64_t keys) {
  switch ((keys + kLanes - 1) / kLanes) {
    case 1: return score_columns<1>(q, q_stride, kp, pairs, mult, S, rows);
    case 2: return score_columns<2>(q, q_stride, kp, pairs, mult, S, rows);
    case 3: return score_columns<3>(q, q_stride, kp, pairs, mult, S, rows);
    default: return score_columns<4>(q, q_stride, kp, pairs, mult, S, rows);
  }
}

// C[r][16 v + l] += sum_i A(r, i) . B(i, 16 v + l) over `count` pairs i, for V vectors of
// columns: A(r, i) = a[r * a_rs + i * a_is] (read one word at a time, so any layout works),
// B(i, column) = b[i * ldb + column].
template <int R, int V>
VLMFAST_TARGET_AVX512BF16 inline void accumulate_rows(const uint32_t* a, int64_t a_rs, int64_t a_is,
                                                      const uint32_t* b, int64_t ldb, int64_t count,
                                                      float* c, int64_t ldc) {
  __m512 acc[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + v * kLanes);
  for (int64_t i = 0; i < count; ++i) {
    __m512bh bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + i * ldb + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_rs + i * a_is]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int R>
VLMFAST_TARGET_AVX512BF16 inline void accumulate_row_group(const uint32_t* a, int64_t a_rs, int64_t a_is,
                                                           const uint32_t* b, int64_t ldb, int64_t count,
                                                           float* c, int64_t ldc, int64_t width) {
  int64_t e = 0;
  for (; e + 4 * kLanes <= width; e += 4 * kLanes)
    accumulate_rows<R, 4>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc);
  switch ((width - e) / kLanes) {
    case 3: accumulate_rows<R, 3>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc); break;
    case 2: accumulate_rows<R, 2>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc); break;
    case 1: accumulate_rows<R, 1>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc); break;
    default: break;
  }
}

// C (rows, width) += A (rows, count pairs) B (count pairs, width), addressed as accumulate_rows
// says; width a multiple of 16.
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void tile_accumulate(
    const uint32_t* a, int64_t a_rs, int64_t a_is, const uint32_t* b, int64_t ldb, int64_t count,
    float* c, int64_t ldc, int64_t rows, int64_t width) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    accumulate_row_group<6>(a + r * a_rs, a_rs, a_is, b, ldb, count, c + r * ldc, ldc, width);
  const uint32_t* ar = a + r * a_rs;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 5: accumulate_row_group<5>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width); break;
    case 4: accumulate_row_group<4>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width); break;
    case 3: accumulate_row_group<3>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width); break;
    case 2: accumulate_row_group<2>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width); break;
    case 1: accumulate_row_group<1>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width); break;
    default: break;
  }
}

// A (rows, 64) float tile rounded to bfloat16 (nearest even) as pairs along its columns:
// out[r * 32 + i] = (X[r][2i], X[r][2i + 1]) (P or dS against pairs of keys).
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void round_pairs_along_keys(
    const float* x, int64_t rows, uint32_t* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < kKeys; h += 2 * kLanes) {
      const __m512bh two = _mm512_cvtne2ps_pbh(_mm512_load_ps(x + r * kKeys + h + kLanes),
                                               _mm512_load_ps(x + r * kKeys + h));
      _mm512_store_si512(out + r * (kKeys / 2) + h / 2, (__m512i)two);
    }
}

// The same tile as pairs along its rows: out[i * 64 + j] = (X[2i][j], X[2i + 1][j]) for
// i < ceil(rows / 2), a missing last row as 0 (P^T or dS^T against pairs of query rows).
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void round_pairs_along_rows(
    const float* x, int64_t rows, uint32_t* out) {
  // word t of the result takes element t / 2 of the even row (t even) or of the odd row
  alignas(64) static const uint16_t kInterleave[2][32] = {
      {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
       24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  const __m512i lo = _mm512_load_si512(kInterleave[0]), hi = _mm512_load_si512(kInterleave[1]);
  for (int64_t i = 0; 2 * i < rows; ++i) {
    const float* even = x + 2 * i * kKeys;
    const float* odd = even + kKeys;
    const bool has_odd = 2 * i + 1 < rows;
    for (int h = 0; h < kKeys; h += 2 * kLanes) {
      const __m512i e = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(even + h + kLanes), _mm512_load_ps(even + h));
      const __m512i o = has_odd ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(odd + h + kLanes), _mm512_load_ps(odd + h))
                                : _mm512_setzero_si512();
      _mm512_store_si512(out + i * kKeys + h, _mm512_permutex2var_epi16(e, lo, o));
      _mm512_store_si512(out + i * kKeys + h + kLanes, _mm512_permutex2var_epi16(e, hi, o));
    }
  }
}

}  // namespace vlmfast::cpu::attention_pairs
#endif
