// 16-lane float vectors (64 bytes: one AVX-512 register, two AVX2 ones) through GCC vector
// extensions, and the helpers the CPU kernels build on. Everything is force-inlined, so it is
// compiled for the instruction set of the multi-versioned function that calls it.
#pragma once

#include <cstdint>

// 64-byte vectors cross only inlined calls; the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define VLMFAST_INLINE __attribute__((always_inline)) inline

namespace vlmfast::cpu {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

VLMFAST_INLINE v16f vload(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
VLMFAST_INLINE v16i vload(const int32_t* p) {
  v16i v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
VLMFAST_INLINE void vstore(float* p, v16f v) { __builtin_memcpy(p, &v, sizeof v); }
// For constants only: with a run-time x, GCC keeps the 0 + x (IEEE: -0 + 0 is +0) before the
// broadcast. Micro-kernels multiply `vector * scalar` instead, which is one vbroadcastss.
VLMFAST_INLINE v16f splat(float x) { return v16f{} + x; }
VLMFAST_INLINE v16f vmax(v16f x, v16f y) { return x > y ? x : y; }
VLMFAST_INLINE float hsum(v16f v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (n rounded with the 1.5 * 2^23 trick), e^r by its Taylor
// polynomial to degree 7 (relative error < 1e-8, below float rounding), 2^n put in the exponent
// bits. Inputs below -87 (including -inf) give 0; NaN stays NaN. Meant for x <= ~0 (softmax and
// sigmoid arguments): large positive x would overflow the exponent field.
VLMFAST_INLINE v16f vexp(v16f x) {
  const v16f magic = splat(12582912.0f);
  const v16f shifted = x * 1.44269504088896341f + magic;
  const v16f n = shifted - magic;
  v16f r = x - n * 0.693145751953125f;  // ln 2 split in two (Cody-Waite) keeps r exact
  r = r - n * 1.428606765330187e-06f;
  v16f p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v16i two_n = ((v16i)shifted - (v16i)magic + 127) << 23;
  const v16f result = p * (v16f)two_n;
  return x < -87.0f ? splat(0.0f) : result;
}

}  // namespace vlmfast::cpu
