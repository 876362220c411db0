// The backward of the Linear GEMM's fused epilogue: dz = dy * act'(z) and db = sum over rows of
// dz, in one pass over dy (csrc/cpu/gemm.h: linear_epilogue_backward).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/gemm.h"
#include "cpu/gemm_activation.h"
#include "cpu/gemm_elements.h"

namespace vlmfast::cpu {
namespace {

namespace ge = gemm_elements;

// Rows [m0, m1) of the epilogue's backward, each row start to end (the rows are contiguous: a
// column-block order would step N elements per row, a new 4 KiB page every row or two, where no
// prefetcher follows). The bias sums of these rows add into `partial` (N floats, this thread's
// own), from dz before it is rounded to T. A last strip narrower than 16 goes through a
// zero-padded vector, whose padded lanes stay 0 (slope(0) * 0).
template <typename T>
__attribute__((always_inline)) inline void epilogue_backward_rows(
    const T* grad, const T* pre, T* grad_pre, float* partial, int64_t m0, int64_t m1, int64_t N,
    Activation act) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* g = grad + m * N;
    const T* z = pre ? pre + m * N : nullptr;
    T* out = grad_pre ? grad_pre + m * N : nullptr;
    for (int64_t j = 0; j < N; j += 16) {
      const int64_t width = std::min<int64_t>(16, N - j);
      const bool whole = width == 16;
      v16f dz = whole ? ge::load16(g + j) : ge::load_part(g + j, width);
      if (act != Activation::None) {
        const v16f zv = whole ? ge::load16(z + j) : ge::load_part(z + j, width);
        dz = dz * gemm_activation::activation_slope(zv, act);
        whole ? ge::store16(out + j, dz) : ge::store_part(out + j, dz, width);
      }
      if (partial) {
        if (whole) {
          vstore(partial + j, vload(partial + j) + dz);
        } else {
          const v16f sum = ge::load_part(partial + j, width) + dz;
          ge::store_part(partial + j, sum, width);
        }
      }
    }
  }
}

template <typename T>
VLMFAST_MULTIVERSION void epilogue_backward_task(const void* grad, const void* pre, void* grad_pre,
                                                 float* partial, int64_t m0, int64_t m1, int64_t N,
                                                 Activation act) {
  epilogue_backward_rows<T>(static_cast<const T*>(grad), static_cast<const T*>(pre),
                            static_cast<T*>(grad_pre), partial, m0, m1, N, act);
}

using TaskFn = void (*)(const void*, const void*, void*, float*, int64_t, int64_t, int64_t, Activation);

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

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
  if (N <= 0) return;
  if (M <= 0) {
    if (grad_bias) std::fill(grad_bias, grad_bias + N, 0.0f);
    return;
  }
  threads = resolve_threads(threads);
  // Blocks of rows, a few per thread; each thread sums its rows' bias gradients into its own
  // partial (N floats), the partials are added at the end.
  constexpr int64_t kRows = 32;
  const int64_t blocks = (M + kRows - 1) / kRows;
  threads = static_cast<int>(std::min<int64_t>(threads, blocks));
  std::vector<float> partials(grad_bias ? static_cast<size_t>(threads) * N : 0, 0.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b)
    task(grad, pre, grad_pre, grad_bias ? partials.data() + thread_index() * N : nullptr, b * kRows,
         std::min(M, (b + 1) * kRows), N, act);
  if (grad_bias) {
    for (int64_t n = 0; n < N; ++n) {
      float sum = 0.0f;
      for (int t = 0; t < threads; ++t) sum += partials[t * N + n];
      grad_bias[n] = sum;
    }
  }
}

}  // namespace vlmfast::cpu
