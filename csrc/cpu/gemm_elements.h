// 16 elements of float32, bfloat16 or float16 to and from a float vector (vec16.h), whole or the
// first `count` of them: the Linear GEMM's epilogues read and write every dtype through these.
// Rounding to 16 bits is to nearest even, as torch rounds (dtype.h's from_float).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/vec16.h"

namespace vlmfast::cpu::gemm_elements {

typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

VLMFAST_INLINE v16f load16(const float* p) { return vload(p); }

VLMFAST_INLINE v16f load16(const BFloat16* p) {
  v16u16 h;
  __builtin_memcpy(&h, p, sizeof h);
  return (v16f)(__builtin_convertvector(h, v16u) << 16);
}

VLMFAST_INLINE v16f load16(const Half* p) {
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = to_float(p[i]);
  return v;
}

VLMFAST_INLINE void store16(float* p, v16f v) { vstore(p, v); }

// v rounded to bfloat16, still as float32 bit patterns (the low 16 bits zero): to nearest even,
// NaN kept quiet with its sign. store16 keeps the high halves; kernels that round an intermediate
// where the eager composite stores a bfloat16 use it in registers.
VLMFAST_INLINE v16u bfloat16_bits(v16f v) {
  const v16u u = (v16u)v;
  const v16u nearest = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const v16u nan = (u | 0x00400000u) & 0xffff0000u;
  return (u & 0x7fffffffu) > 0x7f800000u ? nan : nearest;
}

VLMFAST_INLINE void store16(BFloat16* p, v16f v) {
  const v16u16 h = __builtin_convertvector(bfloat16_bits(v) >> 16, v16u16);
  __builtin_memcpy(p, &h, sizeof h);
}

VLMFAST_INLINE void store16(Half* p, v16f v) {
  for (int i = 0; i < 16; ++i) p[i] = from_float<Half>(v[i]);
}

// v rounded to T's precision and widened back: where an eager composite stores a T between ops.
// bfloat16 in registers (store16's rounding, without the store); float16 through a store and a load.
template <typename T>
VLMFAST_INLINE v16f rounded(v16f v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return (v16f)bfloat16_bits(v);
  } else {
    alignas(64) T tmp[16];
    store16(tmp, v);
    return load16(tmp);
  }
}

// The first `count` (< 16) elements; the other lanes read as 0.
template <typename T>
VLMFAST_INLINE v16f load_part(const T* p, int64_t count) {
  alignas(64) T tmp[16] = {};
  std::copy(p, p + count, tmp);
  return load16(tmp);
}

template <typename T>
VLMFAST_INLINE void store_part(T* p, v16f v, int64_t count) {
  alignas(64) T tmp[16];
  store16(tmp, v);
  std::copy(tmp, tmp + count, p);
}

// The first n (<= 16) elements: a whole vector directly, a row's tail through the partial
// helpers (lanes past n read as 0 and are not written).
template <typename T>
VLMFAST_INLINE v16f load_n(const T* p, int64_t n) {
  return n == 16 ? load16(p) : load_part(p, n);
}

template <typename T>
VLMFAST_INLINE void store_n(T* p, v16f v, int64_t n) {
  if (n == 16) {
    store16(p, v);
  } else {
    store_part(p, v, n);
  }
}

}  // namespace vlmfast::cpu::gemm_elements
