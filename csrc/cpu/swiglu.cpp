#include "cpu/swiglu.h"

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/vec16.h"
#include "cpu/gemm_activation.h"
#include "cpu/gemm_elements.h"
#include "cpu/swiglu_row.h"

#include <algorithm>

namespace vlmfast::cpu {
namespace {

using gemm_activation::vsigmoid;
using gemm_elements::load_n;
using gemm_elements::rounded;
using gemm_elements::store_n;

template <typename T>
VLMFAST_INLINE void forward_rows(const SwigluShape& s, const T* gate_up, T* out, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = gate_up + r * s.stride;
    silu_times_up(gate, gate + s.I, out + r * s.I, s.I);
  }
}

// d gate = (grad * up) * sigma (1 + gate (1 - sigma)), d up = grad * silu(gate): the eager
// autograd's MulBackward (each product rounded) then SiluBackward (in float32, rounded once).
template <typename T>
VLMFAST_INLINE void backward_rows(const SwigluShape& s, const T* grad, const T* gate_up, T* grad_gate_up,
                                  int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = gate_up + r * s.stride;
    const T* up = gate + s.I;
    const T* g_out = grad + r * s.I;
    T* d_gate = grad_gate_up + r * 2 * s.I;
    T* d_up = d_gate + s.I;
    for (int64_t i = 0; i < s.I; i += 16) {
      const int64_t n = std::min<int64_t>(16, s.I - i);
      const v16f g = load_n(gate + i, n), u = load_n(up + i, n), dy = load_n(g_out + i, n);
      const v16f sigma = vsigmoid(g);
      const v16f silu = rounded<T>(g * sigma);
      const v16f d_silu = rounded<T>(dy * u);
      store_n(d_up + i, dy * silu, n);
      store_n(d_gate + i, d_silu * (sigma * (1.0f + g * (1.0f - sigma))), n);
    }
  }
}

// Multi-versioned workers, one per element type, called inside the OpenMP region (as in
// rotary.cpp: a clone attribute on the function holding `omp parallel` would not reach the
// outlined loop body).
#define VLMFAST_SWIGLU_WORKERS(T, SUFFIX)                                                                \
  VLMFAST_MULTIVERSION void forward_##SUFFIX(const SwigluShape& s, const void* gate_up, void* out,       \
                                             int64_t begin, int64_t end) {                              \
    forward_rows(s, static_cast<const T*>(gate_up), static_cast<T*>(out), begin, end);                   \
  }                                                                                                      \
  VLMFAST_MULTIVERSION void backward_##SUFFIX(const SwigluShape& s, const void* grad, const void* gate_up, \
                                              void* grad_gate_up, int64_t begin, int64_t end) {          \
    backward_rows(s, static_cast<const T*>(grad), static_cast<const T*>(gate_up),                        \
                  static_cast<T*>(grad_gate_up), begin, end);                                            \
  }

VLMFAST_SWIGLU_WORKERS(float, f32)
VLMFAST_SWIGLU_WORKERS(Half, f16)
VLMFAST_SWIGLU_WORKERS(BFloat16, bf16)
#undef VLMFAST_SWIGLU_WORKERS

}  // namespace

void swiglu_forward(const SwigluShape& shape, const void* gate_up, void* out, int dtype, int threads) {
  const DType type = dtype_from_tag(dtype);
  parallel_chunks(shape.rows, threads, [&](int64_t begin, int64_t end) {
    switch (type) {
      case DType::Float32: return forward_f32(shape, gate_up, out, begin, end);
      case DType::Float16: return forward_f16(shape, gate_up, out, begin, end);
      case DType::BFloat16: return forward_bf16(shape, gate_up, out, begin, end);
    }
  });
}

void swiglu_backward(const SwigluShape& shape, const void* grad, const void* gate_up, void* grad_gate_up,
                     int dtype, int threads) {
  const DType type = dtype_from_tag(dtype);
  parallel_chunks(shape.rows, threads, [&](int64_t begin, int64_t end) {
    switch (type) {
      case DType::Float32: return backward_f32(shape, grad, gate_up, grad_gate_up, begin, end);
      case DType::Float16: return backward_f16(shape, grad, gate_up, grad_gate_up, begin, end);
      case DType::BFloat16: return backward_bf16(shape, grad, gate_up, grad_gate_up, begin, end);
    }
  });
}

}  // namespace vlmfast::cpu
