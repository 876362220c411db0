// Rotary position embedding on the CPU: entry points bound in csrc/bindings.cpp.
//
// x is viewed as (A, L, M, E): A = the dims before the sequence dim, L = sequence, M = the dims
// between the sequence and the head dim, E = head dim (stride 1). cos/sin are float32 (L, R/2),
// contiguous. Pairs are (i, i + R/2) ("rotate half") or (2i, 2i + 1) when interleaved; head dims
// from R on are copied unchanged.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

struct RotaryShape {
  int64_t A, L, M, E, half_rotary;      // half_rotary = R / 2
  int64_t x_strides[3];                 // strides of A, L, M in elements (E is contiguous)
  int64_t out_strides[3];
};

// out = rotate(x, angle) or, with conjugate, rotate(x, -angle) (the gradient with respect to x).
void rotary_forward(const RotaryShape& shape, const void* x, const float* cos, const float* sin,
                    void* out, int dtype, bool interleaved, bool conjugate, int threads);

// Gradients of the (L, R/2) tables: grad_cos = sum g_a x_a + g_b x_b, grad_sin = sum g_b x_a - g_a x_b
// over A and M (x_strides describe x, out_strides describe grad). Written as float32.
void rotary_table_backward(const RotaryShape& shape, const void* grad, const void* x,
                           float* grad_cos, float* grad_sin, int dtype, bool interleaved,
                           int threads);

}  // namespace vlmfast::cpu
