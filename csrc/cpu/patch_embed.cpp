#include "cpu/patch_embed.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/dtype.h"
#include "common/gemm_kernel.h"
#include "common/parallel.h"

namespace vlmfast::cpu {
namespace {

// ------------------------------------------------------------------------------------------
// The algebra of the fold. The reference computes, per output d and patch row r,
//   out[r, d] = b[d] + sum_k W[d, k] * (x[r, k] * scale[c] + shift[c])          (c = c(k))
// With a per-channel centre m[c] (the raw value that normalises to about 0: round(255 mean) for
// uint8, mean for float images) and x * scale + shift = (x - m) * scale + (shift + m * scale):
//   out[r, d] = (b[d] + sum_k W[d, k] * (shift[c] + m[c] * scale[c]))
//             + sum_k (W[d, k] * scale[c]) * (x[r, k] - m[c])
//             =  b'[d] + sum_k W'[d, k] * x'[r, k].
// So the GEMM runs on centred raw values x' (exact for uint8: integers in -255..255) against the
// scaled weight W', and what is left of the shift collapses into the bias b' (summed in double).
// Exact in real arithmetic. The centring matters in float32: folding the whole shift into b'
// (m = 0) makes sum W' x and b' two large terms that cancel (an image near the mean with
// positive weights lost 10x the tolerance that way); centred, every term has the size of the
// reference's own W x_n, and the error stays that of the reference.
// ------------------------------------------------------------------------------------------

using gemm::AlignedFloats;
using gemm::cpu_has_avx512;
using gemm::micro_kernel_portable;
using gemm::NR;
#if VLMFAST_HAVE_AVX512_PATH
using gemm::micro_kernel_avx512;
#endif

// The folded operands of one call (see the algebra above).
struct Folded {
  const float* weight;  // W' packed in column panels (pack_weight)
  const float* bias;    // b' (D rounded up to NR)
  const float* center;  // m (C,)
};

inline float load_value(const uint8_t* p) { return static_cast<float>(*p); }
template <typename T> inline float load_value(const T* p) { return to_float(*p); }

// Geometry of one call: rows are patches (b, py, px) in raster order.
struct Geometry {
  int64_t grid_h, grid_w, n_per_image, rows, K, pp;
  explicit Geometry(const PatchImage& im)
      : grid_h(im.H / im.patch), grid_w(im.W / im.patch), n_per_image(grid_h * grid_w),
        rows(im.B * grid_h * grid_w), K(im.C * im.patch * im.patch), pp(im.patch * im.patch) {}
};

// Address of the first element (c = 0, i = 0, j = 0) of patch row r.
template <typename T>
inline const T* patch_origin(const PatchImage& im, const Geometry& g, int64_t r) {
  const int64_t b = r / g.n_per_image, n = r % g.n_per_image;
  const int64_t py = n / g.grid_w, px = n % g.grid_w;
  return static_cast<const T*>(im.data) + b * im.strides[0] + py * im.patch * im.strides[2] +
         px * im.patch * im.strides[3];
}

// Packs rows [r0, r0 + count) of the raw patch matrix into panels of MR rows, k-major:
// panel[k * MR + m] = x[r0 + panel_index * MR + m, k]; rows past `count` are zero.
// This is the im2col of the GEMM, done once per row block straight from the image.
template <typename T, int MR>
inline void pack_rows(const PatchImage& im, const Geometry& g, const float* center, int64_t r0,
                      int64_t count, float* packed) {
  const int64_t p = im.patch, panels = (count + MR - 1) / MR;
  for (int64_t panel = 0; panel < panels; ++panel) {
    float* dst = packed + panel * g.K * MR;
    for (int m = 0; m < MR; ++m) {
      const int64_t local = panel * MR + m;
      if (local >= count) {
        for (int64_t k = 0; k < g.K; ++k) dst[k * MR + m] = 0.0f;
        continue;
      }
      const T* origin = patch_origin<T>(im, g, r0 + local);
      for (int64_t c = 0; c < im.C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const T* src = origin + c * im.strides[1] + i * im.strides[2];
          float* out = dst + (c * g.pp + i * p) * MR + m;
          const float m_c = center[c];
          for (int64_t j = 0; j < p; ++j) out[j * MR] = load_value(src + j * im.strides[3]) - m_c;
        }
      }
    }
  }
}

// W' = W * scale[c(k)] packed in column panels of NR, k-major: packed[(d / NR) * K * NR + k * NR
// + d % NR]; columns past D are zero. b'[d] = b[d] + sum_k W[d, k] (shift[c] + m[c] scale[c]),
// summed in double.
template <typename W>
void pack_weight(const W* weight, const W* bias, int64_t D, int64_t K, int64_t pp,
                 const float* scale, const float* shift, const float* center, float* packed,
                 float* bias_folded, int64_t d) {
  float* col = packed + (d / NR) * K * NR + d % NR;
  if (d >= D) {
    for (int64_t k = 0; k < K; ++k) col[k * NR] = 0.0f;
    return;
  }
  const W* row = weight + d * K;
  double shifted = bias ? static_cast<double>(to_float(bias[d])) : 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float w = to_float(row[k]);
    const int64_t c = k / pp;
    col[k * NR] = w * scale[c];
    shifted += static_cast<double>(w) * (static_cast<double>(shift[c]) +
                                         static_cast<double>(center[c]) * scale[c]);
  }
  bias_folded[d] = static_cast<float>(shifted);
}

// Adds b' and writes an MR x NR tile (rows past `rows_left`, columns past D dropped).
template <typename O, int MR>
inline void store_tile(const float* tile, const float* bias_folded, O* out, int64_t D,
                       int64_t row0, int64_t rows_left, int64_t d0) {
  const int64_t cols = std::min<int64_t>(NR, D - d0);
  const int64_t rows = std::min<int64_t>(MR, rows_left);
  for (int64_t m = 0; m < rows; ++m) {
    O* dst = out + (row0 + m) * D + d0;
    const float* src = tile + m * NR;
    for (int64_t n = 0; n < cols; ++n) dst[n] = from_float<O>(src[n] + bias_folded[d0 + n]);
  }
}

// Rows per block: each thread packs MC rows of patches (MC x K floats, L2-resident) and sweeps
// them against every column panel of W' (K x 32, reused MC / MR times from L2). MC is a multiple
// of every MR below, so the packed block needs no extra room.
constexpr int64_t MC = 96;
constexpr int MR_AVX512 = gemm::MR_AVX512;
constexpr int MR_PORTABLE = gemm::MR_PORTABLE;
static_assert(MC % MR_AVX512 == 0 && MC % MR_PORTABLE == 0, "MC must hold whole panels");

// One block of rows: pack it from the image, then every (column panel, row panel) tile.
template <typename T, typename O, int MR, bool AVX512>
__attribute__((always_inline)) inline void forward_block(const PatchImage& im, const Geometry& g,
                                                         const Folded& f, O* out, int64_t D,
                                                         int64_t r0, int64_t count,
                                                         float* a_packed) {
  alignas(64) float tile[MR * NR];
  pack_rows<T, MR>(im, g, f.center, r0, count, a_packed);
  const int64_t panels = (count + MR - 1) / MR, d_panels = (D + NR - 1) / NR;
  for (int64_t dp = 0; dp < d_panels; ++dp) {
    const float* b = f.weight + dp * g.K * NR;
    for (int64_t panel = 0; panel < panels; ++panel) {
#if VLMFAST_HAVE_AVX512_PATH
      if constexpr (AVX512) {
        micro_kernel_avx512<MR>(a_packed + panel * g.K * MR, b, NR, g.K, tile);
      } else
#endif
      {
        micro_kernel_portable<MR>(a_packed + panel * g.K * MR, b, NR, g.K, tile);
      }
      store_tile<O, MR>(tile, f.bias, out, D, r0 + panel * MR, count - panel * MR, dp * NR);
    }
  }
}

template <typename O>
using BlockFn = void (*)(const PatchImage&, const Geometry&, const Folded&, O*, int64_t, int64_t,
                         int64_t, float*);

// Blocks of rows are shared out to the threads; the block function carries the instruction set
// (OpenMP's outlined region would not inherit a target attribute, so the kernel lives below it).
template <typename O>
void forward_rows(BlockFn<O> block_fn, const PatchImage& im, const Geometry& g, const Folded& f,
                  O* out, int64_t D, int threads) {
  const int64_t blocks = (g.rows + MC - 1) / MC;
#pragma omp parallel num_threads(threads)
  {
    AlignedFloats a_packed(static_cast<size_t>(MC * g.K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t r0 = block * MC;
      block_fn(im, g, f, out, D, r0, std::min(MC, g.rows - r0), a_packed.data);
    }
  }
}

template <typename W>
void fold_weight(const W* weight, const W* bias, int64_t D, int64_t K, int64_t pp,
                 const float* scale, const float* shift, const float* center, float* w_packed,
                 float* bias_folded, int threads) {
  const int64_t padded = ((D + NR - 1) / NR) * NR;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t d = 0; d < padded; ++d)
    pack_weight(weight, bias, D, K, pp, scale, shift, center, w_packed, bias_folded, d);
}

// Block functions per (image type, output type): the AVX-512 one behind a target attribute, the
// portable one multi-versioned for AVX2 and the baseline.
#if VLMFAST_HAVE_AVX512_PATH
template <typename T, typename O>
VLMFAST_AVX512 void block_avx512(const PatchImage& im, const Geometry& g, const Folded& f, O* out,
                                 int64_t D, int64_t r0, int64_t count, float* a_packed) {
  forward_block<T, O, MR_AVX512, true>(im, g, f, out, D, r0, count, a_packed);
}
#endif

#define VLMFAST_PATCH_PORTABLE(T, O, NAME)                                                     \
  VLMFAST_MULTIVERSION void NAME(const PatchImage& im, const Geometry& g, const Folded& f,     \
                                 O* out, int64_t D, int64_t r0, int64_t count,                 \
                                 float* a_packed) {                                             \
    forward_block<T, O, MR_PORTABLE, false>(im, g, f, out, D, r0, count, a_packed);             \
  }
VLMFAST_PATCH_PORTABLE(uint8_t, float, portable_u8_f32)
VLMFAST_PATCH_PORTABLE(uint8_t, Half, portable_u8_f16)
VLMFAST_PATCH_PORTABLE(uint8_t, BFloat16, portable_u8_bf16)
VLMFAST_PATCH_PORTABLE(float, float, portable_f32_f32)
VLMFAST_PATCH_PORTABLE(Half, Half, portable_f16_f16)
VLMFAST_PATCH_PORTABLE(BFloat16, BFloat16, portable_bf16_bf16)
#undef VLMFAST_PATCH_PORTABLE

template <typename T, typename O>
void run_forward(const PatchImage& im, const Geometry& g, const Folded& f, O* out, int64_t D,
                 int threads, BlockFn<O> portable) {
  BlockFn<O> block_fn = portable;
#if VLMFAST_HAVE_AVX512_PATH
  static const bool avx512 = cpu_has_avx512();
  if (avx512) block_fn = block_avx512<T, O>;
#endif
  forward_rows<O>(block_fn, im, g, f, out, D, threads);
}

// ---------------------------------------------------------------------------- weight gradient
//
// dW[d, k] = sum_r g[r, d] * x_n[r, k] over the B * N patch rows r: a GEMM whose reduction runs
// over the patches. Computed as C = dW^T (K x D) with the same MR x 32 micro-tiles: A = the
// normalised patches (packed from the image per chunk of rows, like the forward, but not
// folded: this is the gradient of the conv weight itself), B = g read in place (row r's
// columns d0..d0 + 31 are contiguous, rows ldg apart). A task owns a block of k (up to
// GRAD_KC_MAX, all of K for p <= 16 with 3 channels) and a range of d panels, so the reduction
// needs no atomics; its C tiles accumulate in a per-thread buffer across chunks of rows. Whole
// patches per task keep the image reads sequential (splitting K instead made each task fetch a
// few scattered lines per patch, and the packing cost a quarter of the time).

constexpr int64_t GRAD_KC_MAX = 768;  // k columns per task at most (a multiple of every MR)
constexpr int64_t GRAD_RC = 128;      // patch rows per chunk of the reduction
static_assert(GRAD_KC_MAX % MR_AVX512 == 0 && GRAD_KC_MAX % MR_PORTABLE == 0, "whole panels");

struct GradArgs {
  const float* scale;
  const float* shift;
  const float* grad;  // (rows, ldg) float32
  int64_t D, ldg;
  float* grad_weight;  // (D, K) float32
  int64_t kc;          // k columns per task, a multiple of MR
};

// Packs the normalised patch values of rows [r0, r0 + count) and columns [k0, k0 + kc) as
// panels of MR columns, row-major inside: packed[(kp * count + r) * MR + m] = x_n[r0 + r, k0 +
// kp * MR + m]; columns past K are zero. Walks each patch in (c, i, j) order, as stored.
template <typename T, int MR>
inline void pack_grad_rows(const PatchImage& im, const Geometry& g, const GradArgs& args,
                           int64_t k0, int64_t r0, int64_t count, float* packed) {
  const int64_t p = im.patch, k_end = std::min(k0 + args.kc, g.K);
  for (int64_t r = 0; r < count; ++r) {
    const T* origin = patch_origin<T>(im, g, r0 + r);
    int64_t k = k0;
    while (k < k_end) {
      // One run of a patch row: (c, i, j..) for consecutive k.
      const int64_t c = k / g.pp, i = (k % g.pp) / p, j0 = k % p;
      const int64_t run = std::min(p - j0, k_end - k);
      const T* src = origin + c * im.strides[1] + i * im.strides[2] + j0 * im.strides[3];
      const float sc = args.scale[c], sh = args.shift[c];
      for (int64_t t = 0; t < run; ++t) {
        const int64_t kk = k - k0 + t;
        packed[((kk / MR) * count + r) * MR + kk % MR] = load_value(src + t * im.strides[3]) * sc + sh;
      }
      k += run;
    }
    for (int64_t kk = k_end - k0; kk < args.kc; ++kk) packed[((kk / MR) * count + r) * MR + kk % MR] = 0.0f;
  }
}

// One task: columns [k0, k0 + kc) of dW for the d panels [dp0, dp1).
template <typename T, int MR, bool AVX512>
__attribute__((always_inline)) inline void weight_grad_task(const PatchImage& im, const Geometry& g,
                                                            const GradArgs& args, int64_t k0,
                                                            int64_t dp0, int64_t dp1,
                                                            float* a_packed, float* acc) {
  const int64_t k_panels = args.kc / MR, d_panels = dp1 - dp0;
  std::memset(acc, 0, sizeof(float) * d_panels * k_panels * MR * NR);
  for (int64_t r0 = 0; r0 < g.rows; r0 += GRAD_RC) {
    const int64_t count = std::min(GRAD_RC, g.rows - r0);
    pack_grad_rows<T, MR>(im, g, args, k0, r0, count, a_packed);
    for (int64_t dp = 0; dp < d_panels; ++dp) {
      const float* b = args.grad + r0 * args.ldg + (dp0 + dp) * NR;
      for (int64_t kp = 0; kp < k_panels; ++kp) {
        float* tile = acc + (dp * k_panels + kp) * MR * NR;
#if VLMFAST_HAVE_AVX512_PATH
        if constexpr (AVX512) {
          micro_kernel_avx512<MR, true>(a_packed + kp * count * MR, b, args.ldg, count, tile);
        } else
#endif
        {
          micro_kernel_portable<MR, true>(a_packed + kp * count * MR, b, args.ldg, count, tile);
        }
      }
    }
  }
  // acc holds dW^T tiles: tile (dp, kp)[m][n] = dW[(dp0 + dp) * 32 + n, k0 + kp * MR + m].
  const int64_t k_count = std::min(args.kc, g.K - k0);
  for (int64_t dp = 0; dp < d_panels; ++dp)
    for (int64_t kk = 0; kk < k_count; ++kk) {
      const float* row = acc + (dp * k_panels + kk / MR) * MR * NR + (kk % MR) * NR;
      const int64_t d0 = (dp0 + dp) * NR;
      for (int64_t n = 0; n < NR && d0 + n < args.D; ++n)
        args.grad_weight[(d0 + n) * g.K + k0 + kk] = row[n];
    }
}

using GradTaskFn = void (*)(const PatchImage&, const Geometry&, const GradArgs&, int64_t, int64_t,
                            int64_t, float*, float*);

#if VLMFAST_HAVE_AVX512_PATH
template <typename T>
VLMFAST_AVX512 void grad_task_avx512(const PatchImage& im, const Geometry& g, const GradArgs& a,
                                     int64_t k0, int64_t dp0, int64_t dp1, float* packed,
                                     float* acc) {
  weight_grad_task<T, MR_AVX512, true>(im, g, a, k0, dp0, dp1, packed, acc);
}
#endif

#define VLMFAST_GRAD_PORTABLE(T, NAME)                                                        \
  VLMFAST_MULTIVERSION void NAME(const PatchImage& im, const Geometry& g, const GradArgs& a,   \
                                 int64_t k0, int64_t dp0, int64_t dp1, float* packed,         \
                                 float* acc) {                                                \
    weight_grad_task<T, MR_PORTABLE, false>(im, g, a, k0, dp0, dp1, packed, acc);             \
  }
VLMFAST_GRAD_PORTABLE(uint8_t, grad_task_u8)
VLMFAST_GRAD_PORTABLE(float, grad_task_f32)
VLMFAST_GRAD_PORTABLE(Half, grad_task_f16)
VLMFAST_GRAD_PORTABLE(BFloat16, grad_task_bf16)
#undef VLMFAST_GRAD_PORTABLE

template <typename T>
void run_weight_grad(const PatchImage& im, GradArgs args, int threads, GradTaskFn portable) {
  const Geometry g(im);
  GradTaskFn task = portable;
  int mr = MR_PORTABLE;
#if VLMFAST_HAVE_AVX512_PATH
  static const bool avx512 = cpu_has_avx512();
  if (avx512) {
    task = grad_task_avx512<T>;
    mr = MR_AVX512;
  }
#endif
  // Tasks: k blocks x d ranges, at least one per thread (d split when K fits in one block).
  args.kc = std::min<int64_t>(GRAD_KC_MAX, ((g.K + mr - 1) / mr) * mr);
  const int64_t k_tasks = (g.K + args.kc - 1) / args.kc, d_panels = (args.D + NR - 1) / NR;
  const int64_t d_tasks = std::min<int64_t>(d_panels, std::max<int64_t>(1, (threads + k_tasks - 1) / k_tasks));
  const int64_t panels_per_task = (d_panels + d_tasks - 1) / d_tasks;
#pragma omp parallel num_threads(threads)
  {
    AlignedFloats packed(static_cast<size_t>(args.kc * GRAD_RC));
    AlignedFloats acc(static_cast<size_t>(args.kc * panels_per_task * NR));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t kt = 0; kt < k_tasks; ++kt)
      for (int64_t dt = 0; dt < d_tasks; ++dt) {
        const int64_t dp0 = dt * panels_per_task, dp1 = std::min(d_panels, dp0 + panels_per_task);
        if (dp0 < dp1) task(im, g, args, kt * args.kc, dp0, dp1, packed.data, acc.data);
      }
  }
}

// ---------------------------------------------------------------------------- gather

template <typename T, typename O>
__attribute__((always_inline)) inline void gather_impl(const PatchImage& im, const float* scale,
                                                       const float* shift, O* out, int threads) {
  const Geometry g(im);
  const int64_t p = im.patch;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < g.rows; ++r) {
    const T* origin = patch_origin<T>(im, g, r);
    O* dst = out + r * g.K;
    for (int64_t c = 0; c < im.C; ++c) {
      const float sc = scale[c], sh = shift[c];
      for (int64_t i = 0; i < p; ++i) {
        const T* src = origin + c * im.strides[1] + i * im.strides[2];
        O* row = dst + c * g.pp + i * p;
        for (int64_t j = 0; j < p; ++j)
          row[j] = from_float<O>(load_value(src + j * im.strides[3]) * sc + sh);
      }
    }
  }
}

#define VLMFAST_GATHER_ENTRY(T, O, NAME)                                                       \
  VLMFAST_MULTIVERSION void NAME(const PatchImage& im, const float* scale, const float* shift, \
                                 void* out, int threads) {                                     \
    gather_impl<T, O>(im, scale, shift, static_cast<O*>(out), threads);                        \
  }
VLMFAST_GATHER_ENTRY(uint8_t, float, gather_u8_f32)
VLMFAST_GATHER_ENTRY(uint8_t, Half, gather_u8_f16)
VLMFAST_GATHER_ENTRY(uint8_t, BFloat16, gather_u8_bf16)
VLMFAST_GATHER_ENTRY(float, float, gather_f32_f32)
VLMFAST_GATHER_ENTRY(Half, Half, gather_f16_f16)
VLMFAST_GATHER_ENTRY(BFloat16, BFloat16, gather_bf16_bf16)
#undef VLMFAST_GATHER_ENTRY

void check_image(const PatchImage& im) {
  if (im.patch <= 0 || im.H % im.patch || im.W % im.patch)
    throw std::invalid_argument("vlmfast: image H and W must be multiples of the patch size");
  if (im.dtype < 0 || im.dtype > kImageUint8)
    throw std::invalid_argument("vlmfast: unknown image dtype tag " + std::to_string(im.dtype));
}

[[noreturn]] void unsupported_pair() {
  throw std::invalid_argument(
      "vlmfast: patch_embed takes uint8 images with any float weight, or float images of the "
      "weight's dtype");
}

}  // namespace

void patch_embed_forward(const PatchImage& image, const void* weight, const void* bias, int64_t D,
                         int weight_dtype, const float* scale, const float* shift, void* out,
                         int threads) {
  check_image(image);
  threads = resolve_threads(threads);
  const DType wtype = dtype_from_tag(weight_dtype);
  if (image.dtype != kImageUint8 && image.dtype != weight_dtype) unsupported_pair();
  const Geometry g(image);
  if (g.rows == 0 || D == 0) return;
  const int64_t padded = ((D + NR - 1) / NR) * NR;
  AlignedFloats w_packed(static_cast<size_t>(padded * g.K));
  std::vector<float> bias_folded(static_cast<size_t>(padded), 0.0f);
  // The centre m[c]: the raw value whose normalised value is 0 (an integer for uint8, so x - m
  // stays exact); the fold is exact for any m, this one keeps the float32 terms small.
  std::vector<float> center(static_cast<size_t>(image.C));
  for (int64_t c = 0; c < image.C; ++c) {
    const double m = scale[c] != 0.0f ? -static_cast<double>(shift[c]) / scale[c] : 0.0;
    center[c] = image.dtype == kImageUint8 ? static_cast<float>(std::clamp(std::nearbyint(m), 0.0, 255.0))
                                           : static_cast<float>(m);
  }
  switch (wtype) {
    case DType::Float32:
      fold_weight(static_cast<const float*>(weight), static_cast<const float*>(bias), D, g.K, g.pp,
                  scale, shift, center.data(), w_packed.data, bias_folded.data(), threads);
      break;
    case DType::Float16:
      fold_weight(static_cast<const Half*>(weight), static_cast<const Half*>(bias), D, g.K, g.pp,
                  scale, shift, center.data(), w_packed.data, bias_folded.data(), threads);
      break;
    case DType::BFloat16:
      fold_weight(static_cast<const BFloat16*>(weight), static_cast<const BFloat16*>(bias), D, g.K,
                  g.pp, scale, shift, center.data(), w_packed.data, bias_folded.data(), threads);
      break;
  }
  const Folded f{w_packed.data, bias_folded.data(), center.data()};
  const bool u8 = image.dtype == kImageUint8;
  switch (wtype) {
    case DType::Float32:
      if (u8) return run_forward<uint8_t, float>(image, g, f, static_cast<float*>(out), D, threads, portable_u8_f32);
      return run_forward<float, float>(image, g, f, static_cast<float*>(out), D, threads, portable_f32_f32);
    case DType::Float16:
      if (u8) return run_forward<uint8_t, Half>(image, g, f, static_cast<Half*>(out), D, threads, portable_u8_f16);
      return run_forward<Half, Half>(image, g, f, static_cast<Half*>(out), D, threads, portable_f16_f16);
    case DType::BFloat16:
      if (u8) return run_forward<uint8_t, BFloat16>(image, g, f, static_cast<BFloat16*>(out), D, threads, portable_u8_bf16);
      return run_forward<BFloat16, BFloat16>(image, g, f, static_cast<BFloat16*>(out), D, threads, portable_bf16_bf16);
  }
}

void patch_gather(const PatchImage& image, const float* scale, const float* shift, void* out,
                  int out_dtype, int threads) {
  check_image(image);
  threads = resolve_threads(threads);
  const DType otype = dtype_from_tag(out_dtype);
  if (image.dtype != kImageUint8 && image.dtype != out_dtype) unsupported_pair();
  const bool u8 = image.dtype == kImageUint8;
  switch (otype) {
    case DType::Float32: return u8 ? gather_u8_f32(image, scale, shift, out, threads) : gather_f32_f32(image, scale, shift, out, threads);
    case DType::Float16: return u8 ? gather_u8_f16(image, scale, shift, out, threads) : gather_f16_f16(image, scale, shift, out, threads);
    case DType::BFloat16: return u8 ? gather_u8_bf16(image, scale, shift, out, threads) : gather_bf16_bf16(image, scale, shift, out, threads);
  }
}

void patch_embed_weight_grad(const PatchImage& image, const float* scale, const float* shift,
                             const float* grad, int64_t D, int64_t ldg, float* grad_weight,
                             int threads) {
  check_image(image);
  threads = resolve_threads(threads);
  if (ldg < ((D + NR - 1) / NR) * NR)
    throw std::invalid_argument("vlmfast: patch_embed_weight_grad needs grad rows padded to a multiple of 32");
  const GradArgs args{scale, shift, grad, D, ldg, grad_weight, 0};
  switch (image.dtype) {
    case 0: return run_weight_grad<float>(image, args, threads, grad_task_f32);
    case 1: return run_weight_grad<Half>(image, args, threads, grad_task_f16);
    case 2: return run_weight_grad<BFloat16>(image, args, threads, grad_task_bf16);
    default: return run_weight_grad<uint8_t>(image, args, threads, grad_task_u8);
  }
}

}  // namespace vlmfast::cpu
