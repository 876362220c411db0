// The float32 GEMM micro-kernels shared by the CPU kernels that run a GEMM over packed panels
// (cpu/patch_embed.cpp, cpu/gemm.cpp), and the few helpers around them.
//
// A arrives packed in row panels of MR rows, k-major (a[k * MR + m]); B as 32 columns per k,
// ldb floats apart (a packed panel of NR = 32 columns: ldb = NR). One call computes an MR x 32
// tile over K reduction steps into a contiguous row-major tile (tile[m * NR + n]).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define VLMFAST_HAVE_AVX512_PATH 1
#define VLMFAST_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define VLMFAST_HAVE_AVX512_PATH 0
#endif

namespace vlmfast::cpu::gemm {

constexpr int NR = 32;         // output columns per micro-tile: two 16-float vectors
constexpr int MR_AVX512 = 12;  // 24 accumulators + 2 B vectors + 1 broadcast of 32 zmm
constexpr int MR_PORTABLE = 4;

// A 64-byte aligned float buffer (packed panels are read with aligned vector loads).
struct AlignedFloats {
  float* data = nullptr;
  explicit AlignedFloats(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    data = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (!data) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(data); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// Portable micro-kernel: tile[m][n] (+)= sum_k a[k * MR + m] * b[k * ldb + n] over an MR x NR
// tile (ACCUMULATE: adds to what the tile holds, else overwrites it).
template <int MR, bool ACCUMULATE = false>
__attribute__((always_inline)) inline void micro_kernel_portable(const float* a, const float* b,
                                                                 int64_t ldb, int64_t K,
                                                                 float* tile) {
  float acc[MR][NR] = {};
  if constexpr (ACCUMULATE) std::memcpy(acc, tile, sizeof acc);
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    for (int m = 0; m < MR; ++m) {
      const float am = a[k * MR + m];
      for (int n = 0; n < NR; ++n) acc[m][n] += am * bk[n];
    }
  }
  std::memcpy(tile, acc, sizeof acc);
}

#if VLMFAST_HAVE_AVX512_PATH
// AVX-512 micro-kernel, same contract: MR x 32 accumulators held in 2 * MR zmm registers; per
// k, two vector loads of B and MR broadcasts of A feed 2 * MR FMAs. B rows are ldb floats
// apart: NR for a packed panel, the row stride when B is read in place (patch_embed's weight
// gradient reads the output gradient's rows directly).
// Not always_inline: generic templates call it, and GCC refuses to force an AVX-512 body into a
// function without the target; once such a template is inlined into an AVX-512 function, this
// call is inlined as usual.
template <int MR, bool ACCUMULATE = false>
VLMFAST_AVX512 inline void micro_kernel_avx512(const float* a, const float* b, int64_t ldb,
                                               int64_t K, float* tile) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    if constexpr (ACCUMULATE) {
      lo[m] = _mm512_loadu_ps(tile + m * NR);
      hi[m] = _mm512_loadu_ps(tile + m * NR + 16);
    } else {
      lo[m] = hi[m] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * ldb);
    const __m512 b1 = _mm512_loadu_ps(b + k * ldb + 16);
    const float* ak = a + k * MR;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512 am = _mm512_set1_ps(ak[m]);
      lo[m] = _mm512_fmadd_ps(am, b0, lo[m]);
      hi[m] = _mm512_fmadd_ps(am, b1, hi[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(tile + m * NR, lo[m]);
    _mm512_storeu_ps(tile + m * NR + 16, hi[m]);
  }
}
#endif

// Whether the AVX-512 micro-kernel can run here (F, VL, BW, DQ: what x86-64-v4 assumes).
inline bool cpu_has_avx512() {
#if VLMFAST_HAVE_AVX512_PATH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace vlmfast::cpu::gemm
