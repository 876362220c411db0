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
