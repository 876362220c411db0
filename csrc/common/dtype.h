// Element types the kernels accept, and float conversions for the 16-bit ones.
//
// The extension is torch-free, so tensors arrive as raw addresses plus a dtype tag. 16-bit values
// are loaded into float, computed in float and rounded back on store (round to nearest even),
// which is what torch does for its CPU half/bfloat16 kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace vlmfast {

// Tags shared with Python (vlmfast/native/_common.py: DTYPE_TAGS).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float v) { return v; }

inline float to_float(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16: the conversions become single F16C instructions in the AVX2/AVX-512
// clones of the kernels (VLMFAST_MULTIVERSION) and a libgcc routine in the baseline one.
inline float to_float(Half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof h);
  return static_cast<float>(h);
}
#else
inline float to_float(Half v) {
  // IEEE binary16 -> binary32, handling subnormals, infinities and NaN.
  uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1f;
  uint32_t mantissa = v.bits & 0x3ff;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {
    // Subnormal half: normalise the mantissa.
    int shift = 0;
    while (!(mantissa & 0x400)) { mantissa <<= 1; ++shift; }
    mantissa &= 0x3ff;
    u = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
#endif

template <typename T> inline T from_float(float v);

template <> inline float from_float<float>(float v) { return v; }

template <> inline BFloat16 from_float<BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

#if defined(__FLT16_MAX__)
template <> inline Half from_float<Half>(float v) {
  const _Float16 h = static_cast<_Float16>(v);  // IEEE round to nearest even
  Half out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}
#else
template <> inline Half from_float<Half>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00)};  // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00)};  // overflow -> inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): scale into the 10-bit mantissa with round to nearest even.
    if (abs < 0x33000000u) return Half{sign};
    uint32_t exponent = abs >> 23;
    uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exponent;  // 14 + (112 - exponent) + 1 - 1
    uint32_t halfway = 1u << (shift - 1);
    uint32_t rest = mantissa & ((1u << shift) - 1);
    uint32_t result = mantissa >> shift;
    if (rest > halfway || (rest == halfway && (result & 1u))) ++result;
    return Half{static_cast<uint16_t>(sign | result)};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}
#endif

inline DType dtype_from_tag(int tag) {
  if (tag < 0 || tag > 2) throw std::invalid_argument("vlmfast: unknown dtype tag " + std::to_string(tag));
  return static_cast<DType>(tag);
}

}  // namespace vlmfast
