// The products of the CPU attention (csrc/cpu/attention.cpp) on bfloat16 pairs, for bfloat16
// inputs on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 pairs per instruction, twice the
// multiply-adds of a float32 FMA, so the score tile and the P V update (and the backward's five
// products) run at the rate of the bf16 GEMM instead of the float32 one, all through one kernel.
// The softmax between them stays in float32; P is rounded to bfloat16 for the second product, as
// flash-attention and torch's CPU kernel do for low-precision inputs (its row sums are taken
// before the rounding).
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

// C[r][16 v + l] = mult * (C0 + sum_i A(r, i) . B(i, 16 v + l)) over `count` pairs i, for V
// vectors of columns; C0 = C as it was when accumulating, else 0. A(r, i) = a[r * a_rs + i * a_is]
// (read one word at a time, so any layout works), B(i, column) = b[i * ldb + column].
template <int R, int V>
VLMFAST_TARGET_AVX512BF16 inline void product_rows(const uint32_t* a, int64_t a_rs, int64_t a_is,
                                                   const uint32_t* b, int64_t ldb, int64_t count,
                                                   float* c, int64_t ldc, bool accumulate, float mult) {
  __m512 acc[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * kLanes) : _mm512_setzero_ps();
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
  const __m512 m = _mm512_set1_ps(mult);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanes, _mm512_mul_ps(acc[r][v], m));
}

template <int R>
VLMFAST_TARGET_AVX512BF16 inline void product_row_group(const uint32_t* a, int64_t a_rs, int64_t a_is,
                                                        const uint32_t* b, int64_t ldb, int64_t count,
                                                        float* c, int64_t ldc, int64_t width,
                                                        bool accumulate, float mult) {
  int64_t e = 0;
  for (; e + 4 * kLanes <= width; e += 4 * kLanes)
    product_rows<R, 4>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc, accumulate, mult);
  switch ((width - e) / kLanes) {
    case 3: product_rows<R, 3>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc, accumulate, mult); break;
    case 2: product_rows<R, 2>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc, accumulate, mult); break;
    case 1: product_rows<R, 1>(a, a_rs, a_is, b + e, ldb, count, c + e, ldc, accumulate, mult); break;
    default: break;
  }
}

// C (rows, width) = mult * (C0 + A (rows, count pairs) B (count pairs, width)), addressed as
// product_rows says; width a multiple of 16.
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void tile_product(
    const uint32_t* a, int64_t a_rs, int64_t a_is, const uint32_t* b, int64_t ldb, int64_t count,
    float* c, int64_t ldc, int64_t rows, int64_t width, bool accumulate, float mult) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    product_row_group<6>(a + r * a_rs, a_rs, a_is, b, ldb, count, c + r * ldc, ldc, width, accumulate, mult);
  const uint32_t* ar = a + r * a_rs;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 5: product_row_group<5>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width, accumulate, mult); break;
    case 4: product_row_group<4>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width, accumulate, mult); break;
    case 3: product_row_group<3>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width, accumulate, mult); break;
    case 2: product_row_group<2>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width, accumulate, mult); break;
    case 1: product_row_group<1>(ar, a_rs, a_is, b, ldb, count, cr, ldc, width, accumulate, mult); break;
    default: break;
  }
}

// The (rows, 64) score tile S = mult * q k^T: q rows of `pairs` pairs (row stride q_stride), K
// as pairs of the head dim per key. Only the first `keys` columns (rounded up to a vector) are
// computed, the rest left for the caller's mask.
VLMFAST_TARGET_AVX512BF16 inline void tile_scores(const uint32_t* q, int64_t q_stride, const uint32_t* kp,
                                                  int64_t pairs, float mult, float* S, int64_t rows,
                                                  int64_t keys) {
  const int64_t columns = (keys + kLanes - 1) / kLanes * kLanes;
  tile_product(q, q_stride, 1, kp, kKeys, pairs, S, kKeys, rows, columns, /*accumulate=*/false, mult);
}

// C (rows, width) += A (rows, count pairs) B (count pairs, width), addressed as product_rows says.
VLMFAST_TARGET_AVX512BF16 inline void tile_accumulate(const uint32_t* a, int64_t a_rs, int64_t a_is,
                                                      const uint32_t* b, int64_t ldb, int64_t count,
                                                      float* c, int64_t ldc, int64_t rows, int64_t width) {
  tile_product(a, a_rs, a_is, b, ldb, count, c, ldc, rows, width, /*accumulate=*/true, 1.0f);
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
