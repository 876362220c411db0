// The activations fused into the Linear GEMM's epilogue (csrc/cpu/gemm.cpp) and their slopes
// (the epilogue's backward, csrc/cpu/gemm_epilogue.cpp), on 16-lane vectors.
#pragma once

#include "common/vec16.h"
#include "cpu/gemm.h"

namespace vlmfast::cpu::gemm_activation {

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

}  // namespace vlmfast::cpu::gemm_activation
