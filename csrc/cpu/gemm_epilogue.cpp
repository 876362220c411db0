// The backward of the Linear GEMM's fused epilogue: dz = dy * act'(z) and db = sum over rows of
// dz, in one pass over dy (csrc/cpu/gemm.h: linear_epilogue_backward).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/gemm.h"
#include "cpu/gemm_activation.h"
#include "cpu/gemm_elements.h"

namespace vlmfast::cpu {
namespace {

namespace ge = gemm_elements;

// Columns [n0, n0 + cols) (cols <= 64: up to four 16-wide strips, one run per row) of the
// epilogue's backward over all rows. A strip narrower than 16 (the last one) goes through a
// zero-padded vector, whose padded lanes stay 0 (slope(0) * 0). The bias sums add dz before it is
// rounded to T.
constexpr int kStrips = 4;

template <typename T>
__attribute__((always_inline)) inline void epilogue_backward_columns(
    const T* grad, const T* pre, T* grad_pre, float* grad_bias, int64_t M, int64_t N, int64_t n0,
    int64_t cols, Activation act) {
  v16f sums[kStrips] = {};
  const int strips = static_cast<int>((cols + 15) / 16);
  for (int64_t m = 0; m < M; ++m) {
    for (int s = 0; s < strips; ++s) {
      const int64_t at = m * N + n0 + s * 16, width = std::min<int64_t>(16, cols - s * 16);
      const bool whole = width == 16;
      v16f dz = whole ? ge::load16(grad + at) : ge::load_part(grad + at, width);
      if (act != Activation::None) {
        const v16f z = whole ? ge::load16(pre + at) : ge::load_part(pre + at, width);
        dz = dz * gemm_activation::activation_slope(z, act);
        whole ? ge::store16(grad_pre + at, dz) : ge::store_part(grad_pre + at, dz, width);
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
template <typename T>
VLMFAST_MULTIVERSION void epilogue_backward_task(const void* grad, const void* pre, void* grad_pre,
                                                 float* grad_bias, int64_t M, int64_t N,
                                                 int64_t n0, int64_t cols, Activation act) {
  epilogue_backward_columns<T>(static_cast<const T*>(grad), static_cast<const T*>(pre),
                               static_cast<T*>(grad_pre), grad_bias, M, N, n0, cols, act);
}

using TaskFn = void (*)(const void*, const void*, void*, float*, int64_t, int64_t, int64_t, int64_t,
                        Activation);

}  // namespace

void linear_epilogue_backward(const void* grad, const void* pre, void* grad_pre, float* grad_bias,
                              int64_t M, int64_t N, int activation, int dtype, int threads) {
  if (activation < 0 || activation > static_cast<int>(Activation::Gelu))
    throw std::invalid_argument("vlmfast: unknown activation tag " + std::to_string(activation));
  const Activation act = static_cast<Activation>(activation);
  TaskFn task = nullptr;
  switch (dtype_from_tag(dtype)) {
    case DType::Float32: task = epilogue_backward_task<float>; break;
    case DType::BFloat16: task = epilogue_backward_task<BFloat16>; break;
    case DType::Float16: task = epilogue_backward_task<Half>; break;
  }
  if (M <= 0 || N <= 0) return;
  threads = resolve_threads(threads);
  // Tasks of 64 columns: several per thread at the models' widths (768 columns: 12 tasks).
  constexpr int64_t kCols = kStrips * 16;
  const int64_t tasks = (N + kCols - 1) / kCols;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t)
    task(grad, pre, grad_pre, grad_bias, M, N, t * kCols, std::min(kCols, N - t * kCols), act);
}

}  // namespace vlmfast::cpu
