#include "cpu/rope_2d.h"

#include <cmath>

#include "common/parallel.h"

namespace vlmfast::cpu {

void rope_2d_forward(const int64_t* positions, int64_t n, const float* inv_freq, int64_t quarter,
                     float* cos, float* sin, int threads) {
  const int64_t width = 2 * quarter;  // row angles, then column angles
  threads = resolve_threads(threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    // Angles are formed in float32 (position * inv_freq), as transformers does, before cos/sin.
    const float row = static_cast<float>(positions[2 * t]);
    const float col = static_cast<float>(positions[2 * t + 1]);
    float* c = cos + t * width;
    float* s = sin + t * width;
    for (int64_t j = 0; j < quarter; ++j) {
      const float row_angle = row * inv_freq[j], col_angle = col * inv_freq[j];
      c[j] = std::cos(row_angle);
      s[j] = std::sin(row_angle);
      c[quarter + j] = std::cos(col_angle);
      s[quarter + j] = std::sin(col_angle);
    }
  }
}

}  // namespace vlmfast::cpu
