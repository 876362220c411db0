// silu(gate) * up over n columns, rounded where the eager composite F.silu(gate) * up rounds
// (after silu, and the product on its store to T): the forward of csrc/cpu/swiglu.cpp, and the
// MLP activation of the native decode step (csrc/cpu/decode.cpp), whose gate and up are T values
// held as float. Force-inlined: built for the instruction set of the multi-versioned caller.
#pragma once

#include "common/vec16.h"
#include "cpu/gemm_activation.h"
#include "cpu/gemm_elements.h"

#include <algorithm>
#include <cstdint>

namespace vlmfast::cpu {

template <typename T, typename In>
VLMFAST_INLINE void silu_times_up(const In* gate, const In* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const v16f g = gemm_elements::load_n(gate + i, m);
    const v16f silu = gemm_elements::rounded<T>(g * gemm_activation::vsigmoid(g));
    gemm_elements::store_n(out + i, silu * gemm_elements::load_n(up + i, m), m);
  }
}

}  // namespace vlmfast::cpu
