// The matrix-vector kernels of csrc/cpu/decode.cpp (a decode step's few rows against plain
// row-major weights): out[b * N + n] = sum_k w[n * K + k] x[b * K + k] for output rows n in
// [n0, n1). Included by decode.cpp alone.
//
// Rows of w go four at a time (adjacent rows: one contiguous stream for the prefetcher). Each group
// of four is read from memory once and then, from L1, multiplied with the rows of x in tiles of
// four: 4 weight rows x 4 rows of x = 16 accumulators per load of 8 vectors. At one or two rows a
// step streams weights; at eight (a batched decode) a tile of one row of x did 4 multiply-adds per
// 5 loads and the step was bound by the loads (Zen 4: one 512-bit load and one 512-bit FMA a
// cycle), where the 4 x 4 tile does 16 per 8 and reaches the multiply-add rate.
//
// Every output is the same sum whatever B and the tile it lands in: 16 float lanes accumulated over
// k in order (the K tail zero-filled by a mask, last), then summed in one fixed order (sum16 for a
// tile's 16, hsum512 for one). A row's logits do not depend on the other rows of the batch.
#pragma once

#include "common/dtype.h"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLMFAST_DECODE_X86 1
// 512-bit vectors cross only inlined helpers here; the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 headers build shuffles on _mm512_undefined_ps(), which it then flags.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vlmfast::cpu::decode_kernels {

#ifdef VLMFAST_DECODE_X86
#define VLMFAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define VLMFAST_F32_TARGET __attribute__((target("avx512f")))
#define VLMFAST_INLINE __attribute__((always_inline)) inline

// The 16 lanes' sum, added in the order sum16 below adds each of its vectors' lanes: within each
// 128-bit quarter (v0 + v2) + (v1 + v3), then the quarters (q0 + q1) + (q2 + q3). A row's output
// is then the same float whether it came out of a tile or out of single_row.
VLMFAST_F32_TARGET VLMFAST_INLINE float hsum512(__m512 v) {
  __m512 t = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));  // lanes (0, 2) and (1, 3) of each quarter
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));  // quarters (0, 1) and (2, 3)
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0x4E));
  return _mm512_cvtss_f32(t);
}

// The sums of 16 vectors at once, lane j = the sum of a[j]'s lanes (in hsum512's order): a
// transposing tree of 45 shuffles and adds where 16 separate horizontal sums take ~130. A tile's
// 16 dot products at a K of 576 (SmolVLM2's width) were ~20 % of its time in separate sums.
VLMFAST_F32_TARGET VLMFAST_INLINE __m512 sum16(const __m512* a) {
  __m512 pairs[8], quads[4], eights[2];
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m)  // per quarter: a0 + a2, b0 + b2, a1 + a3, b1 + b3 (a, b = a[2m], a[2m + 1])
    pairs[m] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * m], a[2 * m + 1]), _mm512_unpackhi_ps(a[2 * m], a[2 * m + 1]));
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {  // per quarter: the quarter's sums of a[4m .. 4m + 3]
    const __m512d lo = _mm512_castps_pd(pairs[2 * m]), hi = _mm512_castps_pd(pairs[2 * m + 1]);
    quads[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
#pragma GCC unroll 2
  for (int m = 0; m < 2; ++m)  // quarters (0, 1) and (2, 3) of quads[2m], then of quads[2m + 1]
    eights[m] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * m], quads[2 * m + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * m], quads[2 * m + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(eights[0], eights[1], 0x88),
                       _mm512_shuffle_f32x4(eights[0], eights[1], 0xDD));
}

// Software prefetch of the group after next (rows n + 8 .. n + 11) while this one is read, into
// L2 (prefetcht1), in even portions over every step of every tile of this group. A group's rows
// are adjacent, so its bytes are one run whose four interleaved streams then need no ramp-up of
// the hardware prefetcher, and at several tiles the memory reads overlap all of them, not only the
// first (the later tiles read this group from L1). Into L1 (prefetcht0), one group ahead, the
// prefetched lines evicted the rows of x and of the group still in use: measured on the 2-core
// AMD EPYC Zen 4 (micro-benchmark of these kernels over LLaVA's decoder shapes, one thread,
// thread CPU time, loaded machine), float32 at 8 rows 13.0 -> 6.1 ms (35 -> 74 GFLOP/s); bf16 at
// one row, 2 threads, 38.6 GB/s against 24-32 for the L1 or one-group-ahead variants in the same
// run (the old L1, one-group-ahead scheme's own sample there was disturbed: 5.7).
constexpr int64_t kPrefetchGroups = 2;

struct NextGroup {
  const char* p;
  int64_t left;  // lines still to prefetch
  int64_t per;   // lines per step
  VLMFAST_INLINE void step() {
    for (int64_t i = 0; i < per && left > 0; ++i, --left, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// steps: the whole dot-product steps of this group's tiles, in all.
inline NextGroup next_group(const void* w, int64_t row_bytes, int64_t n, int64_t n1, int64_t steps) {
  const int64_t ahead = n + 4 * kPrefetchGroups;
  const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(4, n1 - ahead));
  const int64_t lines = rows * row_bytes / 64;
  return {static_cast<const char*>(w) + ahead * row_bytes, lines, std::max<int64_t>(1, (lines + steps - 1) / steps)};
}

// The two element types' one step of the dot products: bf16 pairs (vdpbf16ps: 32 products into
// 16 float lanes) or float32 (FMA, 16 lanes). A step past `full` is the K tail: only the lanes
// of `tail` load, the rest are zero.
struct Bf16Step {
  using Elem = uint16_t;
  using Vec = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kWidth = 32;
  static VLMFAST_BF16_TARGET VLMFAST_INLINE Mask tail_mask(int64_t n) { return static_cast<Mask>((1ull << n) - 1); }
  static VLMFAST_BF16_TARGET VLMFAST_INLINE Vec load(const Elem* p) { return (Vec)_mm512_loadu_si512(p); }
  static VLMFAST_BF16_TARGET VLMFAST_INLINE Vec load_tail(const Elem* p, Mask m) {
    return (Vec)_mm512_maskz_loadu_epi16(m, p);
  }
  static VLMFAST_BF16_TARGET VLMFAST_INLINE __m512 madd(__m512 acc, Vec w, Vec x) {
    return _mm512_dpbf16_ps(acc, w, x);
  }
};

struct F32Step {
  using Elem = float;
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kWidth = 16;
  static VLMFAST_F32_TARGET VLMFAST_INLINE Mask tail_mask(int64_t n) { return static_cast<Mask>((1u << n) - 1); }
  static VLMFAST_F32_TARGET VLMFAST_INLINE Vec load(const Elem* p) { return _mm512_loadu_ps(p); }
  static VLMFAST_F32_TARGET VLMFAST_INLINE Vec load_tail(const Elem* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static VLMFAST_F32_TARGET VLMFAST_INLINE __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
};

// One tile: weight rows w0 .. w0 + 3K against R rows of x (x, x + K, ...), written to
// out[r * N + i] for i < 4. The prefetch of the next group rides on the tile's steps.
template <typename S, int R>
VLMFAST_BF16_TARGET VLMFAST_INLINE void tile(const typename S::Elem* w0, const typename S::Elem* x, float* out,
                                             int64_t N, int64_t K, NextGroup& next) {
  constexpr int64_t W = S::kWidth;
  const int64_t full = K / W * W;
  __m512 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < full; k += W) {  // whole steps: plain loads, rows addressed from one base
    next.step();
    typename S::Vec v[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) v[i] = S::load(w0 + i * K + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const typename S::Vec xv = S::load(x + r * K + k);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[r][i] = S::madd(acc[r][i], v[i], xv);
    }
  }
  if (k < K) {
    const typename S::Mask m = S::tail_mask(K - k);
    typename S::Vec v[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) v[i] = S::load_tail(w0 + i * K + k, m);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const typename S::Vec xv = S::load_tail(x + r * K + k, m);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[r][i] = S::madd(acc[r][i], v[i], xv);
    }
  }
  __m512 all[16];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) all[r * 4 + i] = r < R ? acc[r][i] : _mm512_setzero_ps();
  const __m512 sums = sum16(all);  // quarter r: row r's four outputs
  _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
  if constexpr (R > 1) _mm_storeu_ps(out + N, _mm512_extractf32x4_ps(sums, 1));
  if constexpr (R > 2) _mm_storeu_ps(out + 2 * N, _mm512_extractf32x4_ps(sums, 2));
  if constexpr (R > 3) _mm_storeu_ps(out + 3 * N, _mm512_extractf32x4_ps(sums, 3));
}

// One weight row (the last N % 4 of a thread's share) against every row of x.
template <typename S>
VLMFAST_BF16_TARGET VLMFAST_INLINE void single_row(const typename S::Elem* wn, const typename S::Elem* x,
                                                   float* out, int64_t B, int64_t N, int64_t K) {
  constexpr int64_t W = S::kWidth;
  const int64_t full = K / W * W;
  for (int64_t b = 0; b < B; ++b) {
    const typename S::Elem* xb = x + b * K;
    __m512 a = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < full; k += W) a = S::madd(a, S::load(wn + k), S::load(xb + k));
    if (k < K) {
      const typename S::Mask m = S::tail_mask(K - k);
      a = S::madd(a, S::load_tail(wn + k, m), S::load_tail(xb + k, m));
    }
    out[b * N] = hsum512(a);
  }
}

template <typename S>
VLMFAST_BF16_TARGET VLMFAST_INLINE void gemv_tiles(const typename S::Elem* w, const typename S::Elem* x, float* out,
                                                   int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(typename S::Elem));
  const int64_t steps = (B + 3) / 4 * std::max<int64_t>(1, K / S::kWidth);  // whole steps of the group's tiles
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const typename S::Elem* w0 = w + n * K;
    NextGroup next = next_group(w, row_bytes, n, n1, steps);
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) tile<S, 4>(w0, x + b * K, out + b * N + n, N, K, next);
    switch (B - b) {
      case 3: tile<S, 3>(w0, x + b * K, out + b * N + n, N, K, next); break;
      case 2: tile<S, 2>(w0, x + b * K, out + b * N + n, N, K, next); break;
      case 1: tile<S, 1>(w0, x + b * K, out + b * N + n, N, K, next); break;
      default: break;
    }
  }
  for (; n < n1; ++n) single_row<S>(w + n * K, x, out + n, B, N, K);
}

// The two entry points (not inlined: one body per element type). Both carry the bf16 target,
// which the shared tile code needs to inline into either: the float32 one runs only where the CPU
// has AVX-512 F, BW and VL (cpu_support) and uses no bf16 instruction (no bf16 intrinsic or type
// reaches it, and GCC emits those instructions for nothing else).
VLMFAST_BF16_TARGET __attribute__((noinline)) inline void gemv_bf16_avx512(
    const uint16_t* w, const uint16_t* x, float* out, int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  gemv_tiles<Bf16Step>(w, x, out, B, N, K, n0, n1);
}

VLMFAST_BF16_TARGET __attribute__((noinline)) inline void gemv_f32_avx512(
    const float* w, const float* x, float* out, int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  gemv_tiles<F32Step>(w, x, out, B, N, K, n0, n1);
}

#endif  // VLMFAST_DECODE_X86

// Any CPU: 16 float partial sums per dot product (lane-wise, so the compiler may vectorise it
// without reordering a sum).
template <typename T>
void gemv_portable(const T* w, const T* x, float* out, int64_t B, int64_t N, int64_t K, int64_t n0,
                   int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      float lanes[16] = {};
      for (int64_t k = 0; k < K; ++k) lanes[k % 16] += to_float(w[n * K + k]) * to_float(x[b * K + k]);
      float sum = 0.0f;
      for (float lane : lanes) sum += lane;
      out[b * N + n] = sum;
    }
  }
}

}  // namespace vlmfast::cpu::decode_kernels
