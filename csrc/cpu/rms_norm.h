// RMSNorm (the Llama decoders' norm) in float32 on the CPU, forward and backward in one pass over
// the rows each: entry points bound in csrc/bindings.cpp. For training steps, where the eager
// composite (pow, mean, rsqrt, two products; its autograd another eight kernels) made each of a
// decoder's norms a dozen passes over the activations.
//
// x, y, dy, dx: (rows, D) contiguous; w, dw: (D,); rstd: (rows,), saved by the forward for the
// backward. y = w * (x * rstd) with rstd = 1 / sqrt(mean(x^2) + eps), the composite's order of
// products.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

void rms_norm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t D,
                      float eps, int threads);

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x * rstd; dw = the sum over
// rows of dy * xhat (written, not accumulated).
void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                       float* dw, int64_t rows, int64_t D, int threads);

}  // namespace vlmfast::cpu
