// Rotary embedding CUDA kernels: entry points bound in csrc/cuda/module.cpp.
// Same layout and maths as csrc/cpu/rotary.h (x viewed as (A, L, M, E), float32 (L, R/2) tables).
#pragma once

#include <cstdint>

namespace vlmfast::cuda {

struct RotaryShape {
  int64_t A, L, M, E, half_rotary;
  int64_t x_strides[3];
  int64_t out_strides[3];
};

void rotary_forward(const RotaryShape& shape, const void* x, const float* cos, const float* sin,
                    void* out, int dtype, bool interleaved, bool conjugate, uintptr_t stream);

void rotary_table_backward(const RotaryShape& shape, const void* grad, const void* x,
                           float* grad_cos, float* grad_sin, int dtype, bool interleaved,
                           uintptr_t stream);

void rope_2d_forward(const int64_t* positions, int64_t n, const float* inv_freq, int64_t quarter,
                     float* cos, float* sin, uintptr_t stream);

}  // namespace vlmfast::cuda
