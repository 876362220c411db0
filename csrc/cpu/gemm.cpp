#include "cpu/gemm.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/gemm_kernel.h"
#include "common/parallel.h"
#include "common/vec16.h"

namespace vlmfast::cpu {
namespace {

using gemm::AlignedFloats;
using gemm::NR;

// Blocking. A task owns MC rows x a range of 32-column panels of the output. Per block of KC
// reduction steps it packs its MC x KC slice of A (L2-resident: 96 x 768 floats = 288 KiB) and
// sweeps it against each B panel (KC x 32, read from L2/L3, reused MC / MR times). K above
// KC_MAX is split into equal blocks whose partial sums accumulate in the output.
constexpr int64_t MC = 96;
constexpr int64_t KC_MAX = 768;
static_assert(MC % gemm::MR_AVX512 == 0 && MC % gemm::MR_PORTABLE == 0, "MC must hold whole panels");

// ---------------------------------------------------------------------------- activations
// Vectorised over 16 lanes (vec16.h), accurate to a few float ulps: well inside the 1e-5
// relative budget of the tests, and stable for any finite input.

// sigma(t) = 1 / (1 + e^-t), from e^-|t| so the exponential never overflows.
VLMFAST_INLINE v16f vsigmoid(v16f t) {
  const v16f e = vexp(t < 0.0f ? t : -t);
  const v16f s = 1.0f / (1.0f + e);
  return t >= 0.0f ? s : e * s;
}

// erfc(x) = t e^{-x^2 + P(t)}, t = 1 / (1 + |x| / 2) for x >= 0 (Chebyshev fit of Numerical
// Recipes' erfcc, relative error < 1.2e-7 everywhere), erfc(-x) = 2 - erfc(x). A relative bound
// keeps gelu(z) = z Phi(z) accurate in the far negative tail too, where erf-based forms cancel.
VLMFAST_INLINE v16f verfc(v16f x) {
  const v16f ax = x < 0.0f ? -x : x;
  const v16f t = 1.0f / (1.0f + 0.5f * ax);
  v16f p = splat(0.17087277f);
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const v16f tail = t * vexp(p - ax * ax);
  return x >= 0.0f ? tail : 2.0f - tail;
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kTanhCubic = 0.044715f;
constexpr float kQuickGelu = 1.702f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

VLMFAST_INLINE v16f activate(v16f z, Activation act) {
  switch (act) {
    case Activation::QuickGelu:  // z sigma(1.702 z)
      return z * vsigmoid(kQuickGelu * z);
    case Activation::GeluTanh:  // z (1 + tanh u) / 2 = z sigma(2u), u = c (z + a z^3)
      return z * vsigmoid(2.0f * kSqrt2OverPi * (z + kTanhCubic * z * z * z));
    case Activation::Gelu:  // z Phi(z) = z erfc(-z / sqrt 2) / 2
      return 0.5f * z * verfc(-kInvSqrt2 * z);
    case Activation::None:
      break;
  }
  return z;
}

// d act / dz at z.
VLMFAST_INLINE v16f activation_slope(v16f z, Activation act) {
  switch (act) {
    case Activation::QuickGelu: {  // s + 1.702 z s (1 - s)
      const v16f s = vsigmoid(kQuickGelu * z);
      return s + kQuickGelu * z * s * (1.0f - s);
    }
    case Activation::GeluTanh: {  // s + z s (1 - s) 2 u'(z), s = sigma(2u)
      const v16f s = vsigmoid(2.0f * kSqrt2OverPi * (z + kTanhCubic * z * z * z));
      const v16f du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * z * z);
      return s + 2.0f * z * s * (1.0f - s) * du;
    }
    case Activation::Gelu:  // Phi(z) + z phi(z)
      return 0.5f * verfc(-kInvSqrt2 * z) + z * kInvSqrt2Pi * vexp(-0.5f * z * z);
    case Activation::None:
      break;
  }
  return splat(1.0f);
}

// ---------------------------------------------------------------------------- packing

// Rows [m0, m0 + count) and reduction steps [k0, k0 + kb) of A into panels of MR rows, k-major:
// packed[panel * kb * MR + k * MR + m]; rows past `count` are zero. Reads along whichever of
// A's dims is contiguous (x is row-major; the dW GEMM's A = dz^T is column-major).
template <int MR>
__attribute__((always_inline)) inline void pack_a(const Matrix& a, int64_t m0, int64_t count,
                                                  int64_t k0, int64_t kb, float* packed) {
  const int64_t panels = (count + MR - 1) / MR;
  for (int64_t panel = 0; panel < panels; ++panel) {
    float* dst = packed + panel * kb * MR;
    const int64_t rows = std::min<int64_t>(MR, count - panel * MR);
    const float* src = a.data + (m0 + panel * MR) * a.row_stride + k0 * a.col_stride;
    if (a.col_stride == 1) {
      for (int64_t m = 0; m < rows; ++m) {
        const float* row = src + m * a.row_stride;
        for (int64_t k = 0; k < kb; ++k) dst[k * MR + m] = row[k];
      }
    } else {
      for (int64_t k = 0; k < kb; ++k) {
        const float* col = src + k * a.col_stride;
        for (int64_t m = 0; m < rows; ++m) dst[k * MR + m] = col[m * a.row_stride];
      }
    }
    for (int64_t m = rows; m < MR; ++m)
      for (int64_t k = 0; k < kb; ++k) dst[k * MR + m] = 0.0f;
  }
}

// One 32-column panel of B, all K, packed k-major; columns past N are zero.
__attribute__((always_inline)) inline void pack_b_panel(const Matrix& b, int64_t N, int64_t K,
                                                        int64_t panel, float* packed) {
  float* dst = packed + panel * K * NR;
  const int64_t n0 = panel * NR, cols = std::min<int64_t>(NR, N - n0);
  if (b.col_stride == 1) {
    // W (N, K) row-major: each column n is a contiguous row of W. Transposed in blocks of 64 k
    // (an 8 KiB slice of the panel stays in L1); a whole-K sweep per n would touch K lines of
    // the panel per row and thrash L1.
    constexpr int64_t KB = 64;
    for (int64_t kb = 0; kb < K; kb += KB) {
      const int64_t k_end = std::min(K, kb + KB);
      for (int64_t n = 0; n < cols; ++n) {
        const float* src = b.data + (n0 + n) * b.row_stride;
        for (int64_t k = kb; k < k_end; ++k) dst[k * NR + n] = src[k];
      }
    }
  } else {  // k-major source (dx = dz W reads W (N, K) as B(k, n)): 32 contiguous floats per k
    for (int64_t k = 0; k < K; ++k) {
      const float* src = b.data + k * b.col_stride + n0 * b.row_stride;
      for (int64_t n = 0; n < cols; ++n) dst[k * NR + n] = src[n * b.row_stride];
    }
  }
  if (cols < NR)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = cols; n < NR; ++n) dst[k * NR + n] = 0.0f;
}

VLMFAST_MULTIVERSION void pack_b_panels(const Matrix& b, int64_t N, int64_t K, int64_t p0,
                                        int64_t p1, float* packed) {
  for (int64_t panel = p0; panel < p1; ++panel) pack_b_panel(b, N, K, panel, packed);
}

// ---------------------------------------------------------------------------- the GEMM

struct Problem {
  Matrix a;
  const float* b;  // packed
  const float* bias;
  int64_t M, N, K, kc;
  Activation act;
  float* out;
  int64_t ldo;
  float* pre;
  int64_t ldp;
};

// Writes an MR x 32 tile (rows past `rows`, columns past N dropped). Blocks of K after the first
// add what earlier blocks left in `out`; the last one adds the bias, keeps the pre-activation
// and applies the activation.
template <int MR>
__attribute__((always_inline)) inline void finish_tile(const Problem& p, float* tile, int64_t m0,
                                                       int64_t rows, int64_t n0, bool first,
                                                       bool last) {
  const int64_t cols = std::min<int64_t>(NR, p.N - n0);
  for (int64_t m = 0; m < rows; ++m) {
    float* t = tile + m * NR;
    float* o = p.out + (m0 + m) * p.ldo + n0;
    if (!first)
      for (int64_t n = 0; n < cols; ++n) t[n] += o[n];
    if (last) {
      if (p.bias)
        for (int64_t n = 0; n < cols; ++n) t[n] += p.bias[n0 + n];
      if (p.pre) std::copy(t, t + cols, p.pre + (m0 + m) * p.ldp + n0);
      if (p.act != Activation::None) {
        vstore(t, activate(vload(t), p.act));
        vstore(t + 16, activate(vload(t + 16), p.act));
      }
    }
    std::copy(t, t + cols, o);
  }
}

// One task: rows [m0, m0 + count) x column panels [np0, np1).
template <int MR, bool AVX512>
__attribute__((always_inline)) inline void gemm_task(const Problem& p, int64_t m0, int64_t count,
                                                     int64_t np0, int64_t np1, float* a_packed) {
  alignas(64) float tile[MR * NR];
  const int64_t panels = (count + MR - 1) / MR;
  for (int64_t k0 = 0; k0 < p.K; k0 += p.kc) {
    const int64_t kb = std::min(p.kc, p.K - k0);
    pack_a<MR>(p.a, m0, count, k0, kb, a_packed);
    for (int64_t np = np0; np < np1; ++np) {
      const float* b = p.b + np * p.K * NR + k0 * NR;  // 128-byte steps: stays 64-byte aligned
      for (int64_t panel = 0; panel < panels; ++panel) {
#if VLMFAST_HAVE_AVX512_PATH
        if constexpr (AVX512) {
          gemm::micro_kernel_avx512<MR>(a_packed + panel * kb * MR, b, NR, kb, tile);
        } else
#endif
        {
          gemm::micro_kernel_portable<MR>(a_packed + panel * kb * MR, b, NR, kb, tile);
        }
        finish_tile<MR>(p, tile, m0 + panel * MR, std::min<int64_t>(MR, count - panel * MR),
                        np * NR, k0 == 0, k0 + kb >= p.K);
      }
    }
  }
}

using TaskFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, float*);

// The task functions carry the instruction set (an OpenMP-outlined region would not inherit a
// target attribute, so the parallel loop calls them through a pointer).
#if VLMFAST_HAVE_AVX512_PATH
VLMFAST_AVX512 void task_avx512(const Problem& p, int64_t m0, int64_t count, int64_t np0,
                                int64_t np1, float* a_packed) {
  gemm_task<gemm::MR_AVX512, true>(p, m0, count, np0, np1, a_packed);
}
#endif

VLMFAST_MULTIVERSION void task_portable(const Problem& p, int64_t m0, int64_t count, int64_t np0,
                                        int64_t np1, float* a_packed) {
  gemm_task<gemm::MR_PORTABLE, false>(p, m0, count, np0, np1, a_packed);
}

void run_gemm(const Problem& p, int threads) {
  TaskFn task = task_portable;
#if VLMFAST_HAVE_AVX512_PATH
  static const bool avx512 = gemm::cpu_has_avx512();
  if (avx512) task = task_avx512;
#endif
  // Tasks: MC-row blocks x chunks of column panels; enough of them (>= ~16 per thread) that the
  // dynamic schedule evens out the threads, while each chunk stays wide enough that re-packing
  // A per chunk costs little.
  const int64_t m_blocks = (p.M + MC - 1) / MC, n_panels = (p.N + NR - 1) / NR;
  const int64_t n_chunks = std::clamp<int64_t>((16 * threads + m_blocks - 1) / m_blocks, 1, n_panels);
  const int64_t per_chunk = (n_panels + n_chunks - 1) / n_chunks;
#pragma omp parallel num_threads(threads)
  {
    AlignedFloats a_packed(static_cast<size_t>(MC * p.kc));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t mb = 0; mb < m_blocks; ++mb)
      for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        const int64_t np0 = chunk * per_chunk, np1 = std::min(n_panels, np0 + per_chunk);
        if (np0 < np1) task(p, mb * MC, std::min(MC, p.M - mb * MC), np0, np1, a_packed.data);
      }
  }
}

// ---------------------------------------------------------------------------- epilogue backward

// Columns [n0, n0 + cols) (cols <= 64: up to four 16-float strips, one 256-byte run per row) of
// the epilogue's backward over all rows. A strip narrower than 16 (the last one) goes through a
// zero-padded vector, whose padded lanes stay 0 (slope(0) * 0).
constexpr int kStrips = 4;

__attribute__((always_inline)) inline void epilogue_backward_columns(
    const float* grad, const float* pre, float* grad_pre, float* grad_bias, int64_t M, int64_t N,
    int64_t n0, int64_t cols, Activation act) {
  v16f sums[kStrips] = {};
  alignas(64) float g[16] = {}, z[16] = {};
  const int strips = static_cast<int>((cols + 15) / 16);
  for (int64_t m = 0; m < M; ++m) {
    for (int s = 0; s < strips; ++s) {
      const int64_t at = m * N + n0 + s * 16, width = std::min<int64_t>(16, cols - s * 16);
      v16f dz;
      if (width == 16) {
        dz = vload(grad + at);
        if (act != Activation::None) {
          dz = dz * activation_slope(vload(pre + at), act);
          vstore(grad_pre + at, dz);
        }
      } else {
        std::copy(grad + at, grad + at + width, g);
        dz = vload(g);
        if (act != Activation::None) {
          std::copy(pre + at, pre + at + width, z);
          dz = dz * activation_slope(vload(z), act);
          vstore(g, dz);
          std::copy(g, g + width, grad_pre + at);
        }
      }
      sums[s] += dz;
    }
  }
  if (grad_bias) {
    alignas(64) float out[kStrips * 16];
    for (int s = 0; s < strips; ++s) vstore(out + s * 16, sums[s]);
    std::copy(out, out + cols, grad_bias + n0);
  }
}

// The threads split the columns, so each bias sum has one owner.
VLMFAST_MULTIVERSION void epilogue_backward_task(const float* grad, const float* pre,
                                                 float* grad_pre, float* grad_bias, int64_t M,
                                                 int64_t N, int64_t n0, int64_t cols,
                                                 Activation act) {
  epilogue_backward_columns(grad, pre, grad_pre, grad_bias, M, N, n0, cols, act);
}

Activation activation_from_tag(int tag) {
  if (tag < 0 || tag > static_cast<int>(Activation::Gelu))
    throw std::invalid_argument("vlmfast: unknown activation tag " + std::to_string(tag));
  return static_cast<Activation>(tag);
}

}  // namespace

int64_t gemm_packed_b_size(int64_t N, int64_t K) { return ((N + NR - 1) / NR) * NR * K; }

void gemm_pack_b(Matrix b, int64_t N, int64_t K, float* packed, int threads) {
  threads = resolve_threads(threads);
  const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t panel = 0; panel < panels; ++panel) pack_b_panels(b, N, K, panel, panel + 1, packed);
}

void gemm_forward(Matrix a, const float* b_packed, const float* bias, int64_t M, int64_t N,
                  int64_t K, int activation, float* out, int64_t ldo, float* pre, int64_t ldp,
                  int threads) {
  const Activation act = activation_from_tag(activation);
  if (M <= 0 || N <= 0) return;
  threads = resolve_threads(threads);
  if (K == 0) {  // empty reduction: act(bias)
    alignas(64) float z[16];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int64_t cols = std::min<int64_t>(16, N - n0);
        for (int64_t n = 0; n < 16; ++n) z[n] = bias && n < cols ? bias[n0 + n] : 0.0f;
        if (pre) std::copy(z, z + cols, pre + m * ldp + n0);
        vstore(z, activate(vload(z), act));
        std::copy(z, z + cols, out + m * ldo + n0);
      }
    return;
  }
  const int64_t k_blocks = (K + KC_MAX - 1) / KC_MAX;
  const Problem p{a, b_packed, bias, M, N, K, (K + k_blocks - 1) / k_blocks, act, out, ldo, pre, ldp};
  run_gemm(p, threads);
}

void linear_epilogue_backward(const float* grad, const float* pre, float* grad_pre,
                              float* grad_bias, int64_t M, int64_t N, int activation,
                              int threads) {
  const Activation act = activation_from_tag(activation);
  if (M <= 0 || N <= 0) return;
  threads = resolve_threads(threads);
  // Tasks of 64 columns: several per thread at the models' widths (768 columns: 12 tasks).
  constexpr int64_t kCols = kStrips * 16;
  const int64_t tasks = (N + kCols - 1) / kCols;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t)
    epilogue_backward_task(grad, pre, grad_pre, grad_bias, M, N, t * kCols,
                           std::min(kCols, N - t * kCols), act);
}

}  // namespace vlmfast::cpu
