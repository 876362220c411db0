#include "cpu/rms_norm.h"

#include "common/parallel.h"
#include "common/vec16.h"
#include "cpu/gemm_elements.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace vlmfast::cpu {
namespace {

using gemm_elements::load_n;
using gemm_elements::store_n;

VLMFAST_MULTIVERSION void forward_rows(const float* x, const float* w, float* y, float* rstd, int64_t D,
                                       float eps, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * D;
    v16f squares{};
    for (int64_t i = 0; i < D; i += 16) {
      const v16f v = load_n(xr + i, std::min<int64_t>(16, D - i));
      squares += v * v;
    }
    const float inv = 1.0f / std::sqrt(hsum_tree(squares) / static_cast<float>(D) + eps);
    rstd[r] = inv;
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = std::min<int64_t>(16, D - i);
      store_n(y + r * D + i, load_n(w + i, n) * (load_n(xr + i, n) * inv), n);
    }
  }
}

// Rows [begin, end): dx, and this chunk's share of dw in `dw_part` (D floats).
VLMFAST_MULTIVERSION void backward_rows(const float* dy, const float* x, const float* w, const float* rstd,
                                        float* dx, float* dw_part, int64_t D, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * D;
    const float* dyr = dy + r * D;
    const float inv = rstd[r];
    v16f dot{};
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = std::min<int64_t>(16, D - i);
      const v16f xhat = load_n(xr + i, n) * inv, d = load_n(dyr + i, n);
      dot += d * load_n(w + i, n) * xhat;
      store_n(dw_part + i, load_n(dw_part + i, n) + d * xhat, n);
    }
    const float mean = hsum_tree(dot) / static_cast<float>(D);
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = std::min<int64_t>(16, D - i);
      const v16f xhat = load_n(xr + i, n) * inv;
      store_n(dx + r * D + i, (load_n(dyr + i, n) * load_n(w + i, n) - xhat * mean) * inv, n);
    }
  }
}

}  // namespace

void rms_norm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t D,
                      float eps, int threads) {
  parallel_chunks(rows, threads, [&](int64_t begin, int64_t end) { forward_rows(x, w, y, rstd, D, eps, begin, end); });
}

void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                       float* dw, int64_t rows, int64_t D, int threads) {
  // one dw partial per chunk (at most `threads`), summed in chunk order: the same result for a
  // given thread count
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(resolve_threads(threads), rows));
  std::vector<float> parts(chunks * D, 0.0f);
  parallel_chunks(chunks, static_cast<int>(chunks), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      backward_rows(dy, x, w, rstd, dx, parts.data() + c * D, D, rows * c / chunks, rows * (c + 1) / chunks);
  });
  for (int64_t i = 0; i < D; ++i) {
    float total = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) total += parts[c * D + i];
    dw[i] = total;
  }
}

}  // namespace vlmfast::cpu
