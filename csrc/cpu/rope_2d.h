// 2D rotary tables on the CPU: entry point bound in csrc/bindings.cpp.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

// positions: (N, 2) int64 (row, col), contiguous. inv_freq: float32 (head_dim / 4,), computed by
// the launcher with the same float32 operations as transformers so the tables match it.
// cos/sin: float32 (N, head_dim / 2) = [cos(row * inv_freq), cos(col * inv_freq)] (and sin).
void rope_2d_forward(const int64_t* positions, int64_t n, const float* inv_freq, int64_t quarter,
                     float* cos, float* sin, int threads);

}  // namespace vlmfast::cpu
