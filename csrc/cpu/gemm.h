// A float32 GEMM for the models' Linear layers (y = act(x W^T + b)) and its backward pieces:
// entry points bound in csrc/bindings.cpp.
//
// Operands are addressed through element strides (Matrix), so the backward's transposed
// operands (dx = dz W, dW = dz^T x) run through the same kernel without copies: only the
// packing reads them differently. B is packed once per call (or once per weight version, by the
// caller) into column panels of 32; A is packed per block of rows inside the kernel.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

// Fused epilogues; tags shared with Python (vlmfast/native/linear.py: ACTIVATION_TAGS).
enum class Activation : int { None = 0, QuickGelu = 1, GeluTanh = 2, Gelu = 3 };

// Element (i, j) lives at data[i * row_stride + j * col_stride].
struct Matrix {
  const float* data;
  int64_t row_stride, col_stride;
};

// Floats needed to hold B (N x K) packed: N rounded up to 32, times K.
int64_t gemm_packed_b_size(int64_t N, int64_t K);

// Packs B (N x K; element (n, k) = b(n, k)) into 32-column panels, k-major:
// packed[(n / 32) * K * 32 + k * 32 + n % 32]; columns past N are zero.
void gemm_pack_b(Matrix b, int64_t N, int64_t K, float* packed, int threads);

// out (M x N, row stride ldo) = act(A (M x K) B^T + bias); B given packed by gemm_pack_b.
// bias: (N,) or null. pre: null, or (M x N, row stride ldp) that receives the pre-activation
// A B^T + bias (what the activation's backward needs).
void gemm_forward(Matrix a, const float* b_packed, const float* bias, int64_t M, int64_t N,
                  int64_t K, int activation, float* out, int64_t ldo, float* pre, int64_t ldp,
                  int threads);

// The epilogue's backward over M x N row-major contiguous matrices: grad_pre = grad * act'(pre)
// (skipped, and grad_pre/pre unused, when activation is None), and when grad_bias is not null
// grad_bias[n] = sum_m grad_pre[m, n] (of grad itself without an activation), in one pass.
void linear_epilogue_backward(const float* grad, const float* pre, float* grad_pre,
                              float* grad_bias, int64_t M, int64_t N, int activation, int threads);

}  // namespace vlmfast::cpu
