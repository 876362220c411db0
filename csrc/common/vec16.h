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

// Horizontal reductions by halving: four shuffles instead of sixteen lane extracts. (hsum above
// adds the lanes in order; its callers keep that order, these are for the attention softmax.)
template <typename Op>
VLMFAST_INLINE float hreduce(v16f v, Op op) {
  v = op(v, __builtin_shuffle(v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = op(v, __builtin_shuffle(v, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = op(v, __builtin_shuffle(v, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = op(v, __builtin_shuffle(v, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}
VLMFAST_INLINE float hmax_tree(v16f v) { return hreduce(v, [](v16f a, v16f b) { return vmax(a, b); }); }
VLMFAST_INLINE float hsum_tree(v16f v) { return hreduce(v, [](v16f a, v16f b) { return a + b; }); }

// 2^x, about 1 ulp for x in [-126, 127]; exactly 0 below -126 (so -inf -> 0: masked keys vanish).
// x = n + f with n = round(x), |f| <= 1/2; 2^f by its degree-7 Taylor polynomial (truncation error
// < 6e-9), 2^n by building the exponent bits. For softmaxes kept in base-2 units.
VLMFAST_INLINE v16f vexp2(v16f x) {
  const v16f lo = splat(-126.0f), hi = splat(127.0f);
  const auto underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v16f shifted = x + magic;
  const v16f n = shifted - magic;
  const v16f f = x - n;
  v16f p = splat(1.525273380405984e-05f);
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const v16i exponent = ((v16i)shifted - (v16i)magic + 127) << 23;
  const v16f result = p * (v16f)exponent;
  return underflow ? splat(0.0f) : result;
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
