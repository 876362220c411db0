// Packing of the Linear GEMM's operands into the layouts its micro-kernels read
// (csrc/cpu/gemm_kernels.h describes them), from any strides and element type.
//
// Values are rounded to the compute dtype on the way (a float32 source computed in bfloat16, as
// autocast rounds it) and widened back to float32 for the float32 kernels, or kept as bfloat16
// bits for the pair layouts. Loops follow whichever dimension of the source is contiguous:
// x is row-major, the backward's transposed operands (W read as B(k, n), dz^T) are column-major.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "cpu/gemm_kernels.h"

namespace vlmfast::cpu::gemm_pack {

using gemm_kernels::NR;

// A source element as the kernels see it: rounded to Compute, then as float32 or bf16 bits.
template <typename Src, typename Compute>
__attribute__((always_inline)) inline float operand(Src v) {
  if constexpr (std::is_same_v<Compute, float> || std::is_same_v<Src, Compute>) {
    return to_float(v);
  } else {
    return to_float(from_float<Compute>(to_float(v)));
  }
}

template <typename Src>
__attribute__((always_inline)) inline uint16_t bf16_bits(Src v) {
  if constexpr (std::is_same_v<Src, BFloat16>) {
    return v.bits;
  } else {
    return from_float<BFloat16>(to_float(v)).bits;
  }
}

// Layout tags: F32Layout<MR> (float32 kernels), PairLayout<MR> (AVX512-BF16), AmxLayout.
template <int MR_>
struct F32Layout {
  static constexpr int MR = MR_, K_STEP = 1;
  using Operand = float;
};
template <int MR_>
struct PairLayout {
  static constexpr int MR = MR_, K_STEP = 2;
  using Operand = uint16_t;
};
struct AmxLayout {
  static constexpr int MR = 32, K_STEP = 32;
  using Operand = uint16_t;
};

// ---------------------------------------------------------------------------- A slivers
// Rows [m0, m0 + rows) and steps [k0, k0 + kb) of A into slivers of MR rows, each kbp steps
// long (kb rounded up to the layout's step); rows past `rows` and steps past kb are zero.
// Sliver s starts at dst + s * MR * kbp.
template <typename Layout, typename Src, typename Compute>
__attribute__((always_inline)) inline void pack_a(const Src* a, int64_t rs, int64_t cs, int64_t m0,
                                                  int64_t rows, int64_t k0, int64_t kb,
                                                  int64_t kbp,
                                                  typename Layout::Operand* dst) {
  constexpr int MR = Layout::MR;
  const int64_t slivers = (rows + MR - 1) / MR;
  for (int64_t s = 0; s < slivers; ++s) {
    auto* d = dst + s * MR * kbp;
    const int64_t r = std::min<int64_t>(MR, rows - s * MR);
    const Src* src = a + (m0 + s * MR) * rs + k0 * cs;
    if constexpr (std::is_same_v<Layout, F32Layout<MR>>) {
      if (cs == 1) {
        for (int64_t m = 0; m < r; ++m) {
          const Src* row = src + m * rs;
          for (int64_t k = 0; k < kb; ++k) d[k * MR + m] = operand<Src, Compute>(row[k]);
        }
      } else {
        for (int64_t k = 0; k < kb; ++k) {
          const Src* col = src + k * cs;
          for (int64_t m = 0; m < r; ++m) d[k * MR + m] = operand<Src, Compute>(col[m * rs]);
        }
      }
      for (int64_t m = r; m < MR; ++m)
        for (int64_t k = 0; k < kb; ++k) d[k * MR + m] = 0.0f;
      // (kbp == kb for float32 layouts)
    } else if constexpr (std::is_same_v<Layout, PairLayout<MR>>) {
      // d[(k / 2) * 2 MR + 2 m + k % 2]
      if (cs == 1) {
        for (int64_t m = 0; m < r; ++m) {
          const Src* row = src + m * rs;
          for (int64_t k = 0; k < kb; ++k) d[(k >> 1) * 2 * MR + 2 * m + (k & 1)] = bf16_bits(row[k]);
        }
      } else {
        for (int64_t k = 0; k < kb; ++k) {
          const Src* col = src + k * cs;
          uint16_t* dk = d + (k >> 1) * 2 * MR + (k & 1);
          for (int64_t m = 0; m < r; ++m) dk[2 * m] = bf16_bits(col[m * rs]);
        }
      }
      for (int64_t m = r; m < MR; ++m)
        for (int64_t k = 0; k < kbp; ++k) d[(k >> 1) * 2 * MR + 2 * m + (k & 1)] = 0;
      for (int64_t k = kb; k < kbp; ++k)
        for (int64_t m = 0; m < r; ++m) d[(k >> 1) * 2 * MR + 2 * m + (k & 1)] = 0;
    } else {
      // AMX: d[(k / 32) * 32 MR + m * 32 + k % 32]
      if (cs == 1) {
        for (int64_t m = 0; m < r; ++m) {
          const Src* row = src + m * rs;
          for (int64_t k = 0; k < kb; ++k) d[(k >> 5) * 32 * MR + m * 32 + (k & 31)] = bf16_bits(row[k]);
        }
      } else {
        for (int64_t k = 0; k < kb; ++k) {
          const Src* col = src + k * cs;
          uint16_t* dk = d + (k >> 5) * 32 * MR + (k & 31);
          for (int64_t m = 0; m < r; ++m) dk[m * 32] = bf16_bits(col[m * rs]);
        }
      }
      for (int64_t m = r; m < MR; ++m)
        for (int64_t k = 0; k < kbp; ++k) d[(k >> 5) * 32 * MR + m * 32 + (k & 31)] = 0;
      for (int64_t k = kb; k < kbp; ++k)
        for (int64_t m = 0; m < r; ++m) d[(k >> 5) * 32 * MR + m * 32 + (k & 31)] = 0;
    }
  }
}

#if VLMFAST_GEMM_X86
// ---------------------------------------------------------------------------- A, vectorised
// Row-major sources into the 12-row slivers of the AVX-512 kernels, 16 steps (float32) or 16
// pairs of steps (bf16) at a time: 12 row loads, a 16 x 16 transpose of 32-bit lanes in
// registers, 16 masked stores of 12 lanes. The scalar loops above write 4 bytes per store.

// r[j] <- column j of the 16 x 16 matrix whose row i is r[i] (32-bit lanes).
VLMFAST_TARGET_AVX512 __attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// One 12-row sliver, `units` 32-bit units per row (float32 steps, or bf16 pairs), from rows
// src + m * rs (m < rows; the other rows zero): d[u * 12 + m] (32-bit units). load(row, u)
// returns the 16 units from u of a row.
template <typename Load>
VLMFAST_TARGET_AVX512 __attribute__((always_inline)) inline void sliver12(Load load, int64_t rows,
                                                                         int64_t units, uint32_t* d) {
  const __mmask16 twelve = 0x0fff;
  int64_t u = 0;
  for (; u + 16 <= units; u += 16) {
    __m512 r[16];
    for (int m = 0; m < 16; ++m) r[m] = m < rows ? load(m, u) : _mm512_setzero_ps();
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(d + (u + j) * 12, twelve, r[j]);
  }
  if (u < units) {  // the last < 16 units: through a zero-padded copy of each row
    alignas(64) float rest[16][16];
    for (int m = 0; m < 16; ++m) _mm512_store_ps(rest[m], m < rows ? load(m, u) : _mm512_setzero_ps());
    for (int64_t j = 0; j < units - u; ++j)
      for (int m = 0; m < 12; ++m) std::memcpy(d + (u + j) * 12 + m, &rest[m][j], 4);
  }
}

// float32 row-major A (col_stride 1) into F32Layout<12> slivers.
VLMFAST_TARGET_AVX512 inline void pack_a_f32_rows12(const float* a, int64_t rs, int64_t m0,
                                                    int64_t rows, int64_t k0, int64_t kb,
                                                    float* dst) {
  const int64_t slivers = (rows + 11) / 12;
  for (int64_t s = 0; s < slivers; ++s) {
    const float* src = a + (m0 + s * 12) * rs + k0;
    const int64_t r = std::min<int64_t>(12, rows - s * 12);
    auto load = [&](int m, int64_t u) VLMFAST_TARGET_AVX512 {
      const int64_t n = std::min<int64_t>(16, kb - u);
      return n == 16 ? _mm512_loadu_ps(src + m * rs + u)
                     : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src + m * rs + u);
    };
    sliver12(load, r, kb, reinterpret_cast<uint32_t*>(dst + s * 12 * kb));
  }
}

// bf16 row-major A into PairLayout<12> slivers (pairs are 32-bit units); kbp - kb steps (at most
// one, an odd kb) are zero.
VLMFAST_TARGET_AVX512 inline void pack_a_bf16_rows12(const uint16_t* a, int64_t rs, int64_t m0,
                                                     int64_t rows, int64_t k0, int64_t kb,
                                                     int64_t kbp, uint16_t* dst) {
  const int64_t slivers = (rows + 11) / 12;
  for (int64_t s = 0; s < slivers; ++s) {
    const uint16_t* src = a + (m0 + s * 12) * rs + k0;
    const int64_t r = std::min<int64_t>(12, rows - s * 12);
    auto load = [&](int m, int64_t u) VLMFAST_TARGET_AVX512 {
      const int64_t n = std::min<int64_t>(32, kb - 2 * u);  // bf16 elements left in the row
      const __m512i v = n == 32 ? _mm512_loadu_si512(src + m * rs + 2 * u)
                                : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1),
                                                           src + m * rs + 2 * u);
      return _mm512_castsi512_ps(v);
    };
    sliver12(load, r, kbp / 2, reinterpret_cast<uint32_t*>(dst + s * 12 * kbp));
  }
}

// float32 row-major A rounded to bf16 (vcvtne2ps2bf16: to nearest even) into PairLayout<12>.
VLMFAST_TARGET_AVX512BF16 inline void pack_a_f32_to_bf16_rows12(const float* a, int64_t rs,
                                                                int64_t m0, int64_t rows,
                                                                int64_t k0, int64_t kb,
                                                                int64_t kbp, uint16_t* dst) {
  const int64_t slivers = (rows + 11) / 12;
  for (int64_t s = 0; s < slivers; ++s) {
    const float* src = a + (m0 + s * 12) * rs + k0;
    const int64_t r = std::min<int64_t>(12, rows - s * 12);
    auto load = [&](int m, int64_t u) VLMFAST_TARGET_AVX512BF16 {
      const float* p = src + m * rs + 2 * u;
      const int64_t n = std::min<int64_t>(32, kb - 2 * u);
      const __m512 lo = n >= 16 ? _mm512_loadu_ps(p)
                                : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
      const __m512 hi = n >= 32 ? _mm512_loadu_ps(p + 16)
                        : n > 16 ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - 16)) - 1), p + 16)
                                 : _mm512_setzero_ps();
      return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    };
    sliver12(load, r, kbp / 2, reinterpret_cast<uint32_t*>(dst + s * 12 * kbp));
  }
}
// bf16 A given column-major (the weight gradient's A = dz^T: A(m, k) = dz[k][m], rows of dz
// contiguous in m) into PairLayout<12>: per pair of steps, 12 values of each of two rows of dz,
// widened to 32 bits and merged into 12 (A(m, k), A(m, k + 1)) pairs.
VLMFAST_TARGET_AVX512 inline void pack_a_bf16_cols12(const uint16_t* a, int64_t cs, int64_t m0,
                                                     int64_t rows, int64_t k0, int64_t kb,
                                                     int64_t kbp, uint16_t* dst) {
  const int64_t slivers = (rows + 11) / 12;
  for (int64_t s = 0; s < slivers; ++s) {
    const int64_t r = std::min<int64_t>(12, rows - s * 12);
    const __mmask16 valid = static_cast<__mmask16>((1u << r) - 1);
    const uint16_t* src = a + (m0 + s * 12) + k0 * cs;
    uint16_t* d = dst + s * 12 * kbp;
    for (int64_t k = 0; k < kbp; k += 2) {
      // rows of dz lie N elements apart, a page or more: no hardware prefetcher follows
      if (k + 16 < kb) {
        _mm_prefetch(reinterpret_cast<const char*>(src + (k + 16) * cs), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(src + (k + 17) * cs), _MM_HINT_T0);
      }
      const __m512i even = k < kb ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, src + k * cs))
                                  : _mm512_setzero_si512();
      const __m512i odd = k + 1 < kb ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, src + (k + 1) * cs))
                                     : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(d + k * 12, 0x0fff, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
  }
}

// 16 bf16 values at p (the first `count` of them, the rest 0) widened to 32-bit lanes; a float32
// source is rounded to bf16 first (vcvtneps2bf16).
VLMFAST_TARGET_AVX512BF16 __attribute__((always_inline)) inline __m512i widen16(const uint16_t* p,
                                                                               int64_t count) {
  const __mmask16 m = count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
VLMFAST_TARGET_AVX512BF16 __attribute__((always_inline)) inline __m512i widen16(const float* p,
                                                                               int64_t count) {
  const __mmask16 m = count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p)));
}

// A B panel in pairs from a step-major source (dx = dz W reads W as B(n, k) = W[k][n]; the
// weight gradient reads x as B(n, k) = x[k][n]): per pair of steps, two source rows of 32
// contiguous columns merged into 32 pairs. dst as pack_b_panel's pair layout.
template <typename Src>
VLMFAST_TARGET_AVX512BF16 inline void pack_b_pairs_from_steps(const Src* b, int64_t cs, int64_t N,
                                                              int64_t K, int64_t kp, int64_t p,
                                                              uint16_t* packed) {
  uint16_t* dst = packed + p * NR * kp;
  const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
  for (int64_t k = 0; k < kp; k += 2) {
    // source rows lie a row stride apart, often a page or more: prefetch those 16 steps ahead
    if (k + 16 < K) {
      _mm_prefetch(reinterpret_cast<const char*>(b + (k + 16) * cs + n0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + (k + 17) * cs + n0), _MM_HINT_T0);
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t count = std::clamp<int64_t>(cols - 16 * h, 0, 16);
      const __m512i even = k < K && count ? widen16(b + k * cs + n0 + 16 * h, count) : _mm512_setzero_si512();
      const __m512i odd = k + 1 < K && count ? widen16(b + (k + 1) * cs + n0 + 16 * h, count)
                                             : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + k * NR + 32 * h, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
  }
}

// A B panel from a row-major source (the forward's W: column n of B is row n of W), 16 columns x
// 16 32-bit units (float32 steps, or bf16 pairs of steps) at a time through transpose16.
// units: the panel's units (K, or kp / 2 for pairs); load(row, u) the 16 units from u of a row
// (zero past the row's end).
template <typename Load>
VLMFAST_TARGET_AVX512 __attribute__((always_inline)) inline void panel_rows32(Load load, int64_t cols,
                                                                             int64_t units,
                                                                             uint32_t* dst) {
  for (int nb = 0; nb < 32; nb += 16) {
    for (int64_t u = 0; u < units; u += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = nb + i < cols ? load(nb + i, u) : _mm512_setzero_ps();
      transpose16(r);
      const int64_t n = std::min<int64_t>(16, units - u);
      for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(dst + (u + j) * 32 + nb, r[j]);
    }
  }
}

VLMFAST_TARGET_AVX512 inline void pack_b_f32_rows(const float* b, int64_t rs, int64_t N, int64_t K,
                                                  int64_t p, float* packed) {
  const float* src = b + p * NR * rs;
  auto load = [&](int n, int64_t u) VLMFAST_TARGET_AVX512 {
    const int64_t c = std::min<int64_t>(16, K - u);
    return c == 16 ? _mm512_loadu_ps(src + n * rs + u)
                   : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << c) - 1), src + n * rs + u);
  };
  panel_rows32(load, std::min<int64_t>(NR, N - p * NR), K, reinterpret_cast<uint32_t*>(packed + p * NR * K));
}

VLMFAST_TARGET_AVX512 inline void pack_b_bf16_pairs_rows(const uint16_t* b, int64_t rs, int64_t N,
                                                         int64_t K, int64_t kp, int64_t p,
                                                         uint16_t* packed) {
  const uint16_t* src = b + p * NR * rs;
  auto load = [&](int n, int64_t u) VLMFAST_TARGET_AVX512 {
    const int64_t c = std::clamp<int64_t>(K - 2 * u, 0, 32);  // bf16 values left in the row
    const __m512i v = c == 32 ? _mm512_loadu_si512(src + n * rs + 2 * u)
                              : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << c) - 1), src + n * rs + 2 * u);
    return _mm512_castsi512_ps(v);
  };
  panel_rows32(load, std::min<int64_t>(NR, N - p * NR), kp / 2, reinterpret_cast<uint32_t*>(packed + p * NR * kp));
}
#endif

// ---------------------------------------------------------------------------- B panels
// Panel p (columns [32 p, 32 p + 32)) of B (N x K), all of K (kp steps: K rounded up to the
// layout's step; zero past K and past N). Float32: dst[k * 32 + n]; pairs:
// dst[(k / 2) * 64 + 2 n + k % 2]. The panel starts at packed + p * 32 * kp.
template <bool PAIRS, typename Src, typename Compute>
__attribute__((always_inline)) inline void pack_b_panel(const Src* b, int64_t rs, int64_t cs,
                                                        int64_t N, int64_t K, int64_t kp,
                                                        int64_t p,
                                                        std::conditional_t<PAIRS, uint16_t, float>* packed) {
  auto* dst = packed + p * NR * kp;
  const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
  auto at = [&](int64_t k, int64_t n) -> auto& {
    if constexpr (PAIRS) {
      return dst[(k >> 1) * 2 * NR + 2 * n + (k & 1)];
    } else {
      return dst[k * NR + n];
    }
  };
  auto value = [](Src v) {
    if constexpr (PAIRS) {
      return bf16_bits(v);
    } else {
      return operand<Src, Compute>(v);
    }
  };
  if (cs == 1) {
    // W (N, K) row-major: column n of B is a contiguous row of W. Transposed in blocks of 64
    // steps, so the slice of the panel being written stays in L1.
    constexpr int64_t KB = 64;
    for (int64_t kb = 0; kb < K; kb += KB) {
      const int64_t k_end = std::min(K, kb + KB);
      for (int64_t n = 0; n < cols; ++n) {
        const Src* src = b + (n0 + n) * rs;
        for (int64_t k = kb; k < k_end; ++k) at(k, n) = value(src[k]);
      }
    }
  } else {  // step-major source (dx = dz W reads W as B(k, n)): 32 contiguous columns per step
    for (int64_t k = 0; k < K; ++k) {
      const Src* src = b + k * cs + n0 * rs;
      for (int64_t n = 0; n < cols; ++n) at(k, n) = value(src[n * rs]);
    }
  }
  for (int64_t k = 0; k < kp; ++k)
    for (int64_t n = (k < K ? cols : 0); n < NR; ++n) at(k, n) = 0;
}

}  // namespace vlmfast::cpu::gemm_pack
