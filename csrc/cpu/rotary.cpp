#include "cpu/rotary.h"

#include "common/dtype.h"
#include "common/parallel.h"

#include <algorithm>

namespace vlmfast::cpu {
namespace {

// Index of the two halves of pair i: (i, i + half) or, interleaved, (2i, 2i + 1).
inline void pair_index(int64_t i, int64_t half, bool interleaved, int64_t& a, int64_t& b) {
  a = interleaved ? 2 * i : i;
  b = interleaved ? 2 * i + 1 : i + half;
}

template <typename T>
__attribute__((always_inline)) inline void rotate_row(const T* x, const float* cos, const float* sin,
                                                      T* out, int64_t E, int64_t half,
                                                      bool interleaved, float sin_sign) {
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      float xa = to_float(x[2 * i]), xb = to_float(x[2 * i + 1]);
      float c = cos[i], s = sin_sign * sin[i];
      out[2 * i] = from_float<T>(xa * c - xb * s);
      out[2 * i + 1] = from_float<T>(xb * c + xa * s);
    }
  } else {
    // Separate contiguous halves: this loop vectorises cleanly.
    for (int64_t i = 0; i < half; ++i) {
      float xa = to_float(x[i]), xb = to_float(x[i + half]);
      float c = cos[i], s = sin_sign * sin[i];
      out[i] = from_float<T>(xa * c - xb * s);
      out[i + half] = from_float<T>(xb * c + xa * s);
    }
  }
  for (int64_t e = 2 * half; e < E; ++e) out[e] = x[e];
}

// Rows [begin, end) of the (A, L, M) grid of head vectors.
template <typename T>
__attribute__((always_inline)) inline void forward_rows(const RotaryShape& s, const T* x,
                                                        const float* cos, const float* sin, T* out,
                                                        bool interleaved, float sin_sign,
                                                        int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    int64_t m = r % s.M, l = (r / s.M) % s.L, a = r / (s.M * s.L);
    const T* x_row = x + a * s.x_strides[0] + l * s.x_strides[1] + m * s.x_strides[2];
    T* out_row = out + a * s.out_strides[0] + l * s.out_strides[1] + m * s.out_strides[2];
    rotate_row(x_row, cos + l * s.half_rotary, sin + l * s.half_rotary, out_row, s.E,
               s.half_rotary, interleaved, sin_sign);
  }
}

// Table gradients of sequence positions [begin, end): each (l, i) sums over the A * M rows that
// share its angle, so no two tasks write the same entry.
template <typename T>
__attribute__((always_inline)) inline void table_backward_positions(
    const RotaryShape& s, const T* grad, const T* x, float* grad_cos, float* grad_sin,
    bool interleaved, int64_t begin, int64_t end) {
  for (int64_t l = begin; l < end; ++l) {
    float* dc = grad_cos + l * s.half_rotary;
    float* ds = grad_sin + l * s.half_rotary;
    for (int64_t i = 0; i < s.half_rotary; ++i) dc[i] = ds[i] = 0.0f;
    for (int64_t a = 0; a < s.A; ++a) {
      for (int64_t m = 0; m < s.M; ++m) {
        const T* x_row = x + a * s.x_strides[0] + l * s.x_strides[1] + m * s.x_strides[2];
        const T* g_row = grad + a * s.out_strides[0] + l * s.out_strides[1] + m * s.out_strides[2];
        for (int64_t i = 0; i < s.half_rotary; ++i) {
          int64_t ia, ib;
          pair_index(i, s.half_rotary, interleaved, ia, ib);
          float xa = to_float(x_row[ia]), xb = to_float(x_row[ib]);
          float ga = to_float(g_row[ia]), gb = to_float(g_row[ib]);
          dc[i] += ga * xa + gb * xb;
          ds[i] += gb * xa - ga * xb;
        }
      }
    }
  }
}

// Multi-versioned workers, one per element type (target_clones cannot take templates). They are
// called from inside the OpenMP regions below: a clone attribute on a function holding the
// `omp parallel` would not reach the loop body, which OpenMP outlines into a function of its own.
#define VLMFAST_ROTARY_WORKERS(T, SUFFIX)                                                       \
  VLMFAST_MULTIVERSION void forward_rows_##SUFFIX(const RotaryShape& s, const void* x,          \
                                                  const float* cos, const float* sin, void* out, \
                                                  bool interleaved, float sin_sign,              \
                                                  int64_t begin, int64_t end) {                  \
    forward_rows(s, static_cast<const T*>(x), cos, sin, static_cast<T*>(out), interleaved,      \
                 sin_sign, begin, end);                                                         \
  }                                                                                             \
  VLMFAST_MULTIVERSION void table_backward_##SUFFIX(const RotaryShape& s, const void* g,        \
                                                    const void* x, float* dc, float* ds,        \
                                                    bool interleaved, int64_t begin,            \
                                                    int64_t end) {                              \
    table_backward_positions(s, static_cast<const T*>(g), static_cast<const T*>(x), dc, ds,     \
                             interleaved, begin, end);                                          \
  }

VLMFAST_ROTARY_WORKERS(float, f32)
VLMFAST_ROTARY_WORKERS(Half, f16)
VLMFAST_ROTARY_WORKERS(BFloat16, bf16)

}  // namespace

void rotary_forward(const RotaryShape& shape, const void* x, const float* cos, const float* sin,
                    void* out, int dtype, bool interleaved, bool conjugate, int threads) {
  const float sin_sign = conjugate ? -1.0f : 1.0f;
  const DType type = dtype_from_tag(dtype);
  parallel_chunks(shape.A * shape.L * shape.M, threads, [&](int64_t begin, int64_t end) {
    switch (type) {
      case DType::Float32: return forward_rows_f32(shape, x, cos, sin, out, interleaved, sin_sign, begin, end);
      case DType::Float16: return forward_rows_f16(shape, x, cos, sin, out, interleaved, sin_sign, begin, end);
      case DType::BFloat16: return forward_rows_bf16(shape, x, cos, sin, out, interleaved, sin_sign, begin, end);
    }
  });
}

void rotary_table_backward(const RotaryShape& shape, const void* grad, const void* x,
                           float* grad_cos, float* grad_sin, int dtype, bool interleaved,
                           int threads) {
  const DType type = dtype_from_tag(dtype);
  parallel_chunks(shape.L, threads, [&](int64_t begin, int64_t end) {
    switch (type) {
      case DType::Float32: return table_backward_f32(shape, grad, x, grad_cos, grad_sin, interleaved, begin, end);
      case DType::Float16: return table_backward_f16(shape, grad, x, grad_cos, grad_sin, interleaved, begin, end);
      case DType::BFloat16: return table_backward_bf16(shape, grad, x, grad_cos, grad_sin, interleaved, begin, end);
    }
  });
}

}  // namespace vlmfast::cpu
