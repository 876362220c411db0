// The two products of the CPU attention (csrc/cpu/attention.cpp) on bfloat16 pairs, for
// bfloat16 inputs on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 pairs per instruction, twice
// the multiply-adds of a float32 FMA, so the score tile and the P V update run at the rate of
// the bf16 GEMM instead of the float32 one. The softmax between them stays in float32; P is
// rounded to bfloat16 for the second product, as flash-attention and torch's CPU kernel do for
// low-precision inputs (its row sums are taken before the rounding).
//
// Layouts (a "pair" is two bfloat16 in one 32-bit word, the lower-addressed one in the low half):
//   q rows: pair p of row r at q[r * q_stride + p] (the head dim padded to `width` with zeros);
//   K tile: pair p (head-dim elements 2p, 2p + 1) of key j at kp[p * 64 + j];
//   V tile: keys 2i and 2i + 1 of head-dim element e at vp[i * width + e];
//   P: a (rows, 64) float tile (a score tile after the softmax step), rounded here.
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

// acc[r][16 v + i] += sum_k P(r, k) V(k, 16 v + i) over key pairs, for V vectors of the head dim.
// p32: the rows of P as pairs (32 per row).
template <int R, int V>
VLMFAST_TARGET_AVX512BF16 inline void accumulate_rows(const uint32_t* p32, const uint32_t* vp, int64_t width,
                                                      int64_t key_pairs, float* acc) {
  __m512 c[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = _mm512_loadu_ps(acc + r * width + v * kLanes);
  for (int64_t i = 0; i < key_pairs; ++i) {
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(vp + i * width + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(p32[r * (kKeys / 2) + i]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + r * width + v * kLanes, c[r][v]);
}

template <int R>
VLMFAST_TARGET_AVX512BF16 inline void accumulate_row_group(const uint32_t* p32, const uint32_t* vp,
                                                           int64_t width, int64_t key_pairs, float* acc) {
  int64_t e = 0;
  for (; e + 4 * kLanes <= width; e += 4 * kLanes) accumulate_rows<R, 4>(p32, vp + e, width, key_pairs, acc + e);
  switch ((width - e) / kLanes) {
    case 3: accumulate_rows<R, 3>(p32, vp + e, width, key_pairs, acc + e); break;
    case 2: accumulate_rows<R, 2>(p32, vp + e, width, key_pairs, acc + e); break;
    case 1: accumulate_rows<R, 1>(p32, vp + e, width, key_pairs, acc + e); break;
    default: break;
  }
}

// acc (rows, width) += P V over the first `keys` keys of the tile: P (rows, 64) float, rounded
// to bfloat16 (nearest even) into `p32` (rows x 32 words of scratch); width a multiple of 16.
VLMFAST_TARGET_AVX512BF16 __attribute__((noinline)) inline void tile_accumulate(
    const float* P, uint32_t* p32, const uint32_t* vp, int64_t keys, float* acc, int64_t width,
    int64_t rows) {
  const int64_t key_pairs = (keys + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < kKeys; h += 2 * kLanes) {
      const __m512bh two = _mm512_cvtne2ps_pbh(_mm512_load_ps(P + r * kKeys + h + kLanes),
                                               _mm512_load_ps(P + r * kKeys + h));
      _mm512_store_si512(p32 + r * (kKeys / 2) + h / 2, (__m512i)two);
    }
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    accumulate_row_group<6>(p32 + r * (kKeys / 2), vp, width, key_pairs, acc + r * width);
  const uint32_t* pr = p32 + r * (kKeys / 2);
  float* ar = acc + r * width;
  switch (rows - r) {
    case 5: accumulate_row_group<5>(pr, vp, width, key_pairs, ar); break;
    case 4: accumulate_row_group<4>(pr, vp, width, key_pairs, ar); break;
    case 3: accumulate_row_group<3>(pr, vp, width, key_pairs, ar); break;
    case 2: accumulate_row_group<2>(pr, vp, width, key_pairs, ar); break;
    case 1: accumulate_row_group<1>(pr, vp, width, key_pairs, ar); break;
    default: break;
  }
}

}  // namespace vlmfast::cpu::attention_pairs
#endif
