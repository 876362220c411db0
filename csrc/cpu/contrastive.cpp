// Fused contrastive losses on the CPU, in O(B * D) memory.
//
// The maths. a_i, b_j are the (normalised) image and text features, s the logit scale, t the bias,
// l_ij = s * a_i . b_j (+ t for SigLIP), g the upstream gradient of the loss.
//
// InfoNCE (CLIP):  loss = 1/(2B) sum_i (R_i - l_ii) + 1/(2B) sum_j (C_j - l_jj),
//   R_i = logsumexp_j l_ij (row log-sum-exp), C_j = logsumexp_i l_ij (column log-sum-exp).
//   d loss / d l_ij = (P_ij + Q_ij - 2 [i == j]) / (2B),  P_ij = exp(l_ij - R_i) (softmax of row i),
//   Q_ij = exp(l_ij - C_j) (softmax of column j).
// SigLIP:  loss = 1/B sum_ij softplus(-y_ij l_ij), y = 2I - 1, i.e. softplus(l_ij) off the diagonal
//   and softplus(-l_ii) on it;  d loss / d l_ij = sigmoid(l_ij) / B off the diagonal and
//   -sigmoid(-l_ii) / B = (sigmoid(l_ii) - 1) / B on it.
// Either way, with G_ij = g * d loss / d l_ij:
//   d a_i = s sum_j G_ij b_j,   d b_j = s sum_i G_ij a_i,   d s = sum_ij G_ij (a_i . b_j),
//   d t = sum_ij G_ij (SigLIP).
//
// The work. The B x B logits are computed in kTile x kTile tiles and thrown away. The forward makes
// one pass over the tiles: each thread owns a block of rows and keeps their running (max, sum of
// exp) (online log-sum-exp), and a private copy of the running (max, sum) of every column, merged
// once at the end. The backward makes one pass too: per tile it recomputes the dots, forms G, and
// does two GEMM-like updates, d a[I] += G b[J] (rows owned by the thread) and d b[J] += G^T a[I]
// (into a per-thread partial of d b, summed at the end). On CPUs with AVX-512 every product runs
// through the Linear GEMM's 12 x 32 micro-kernel (csrc/cpu/gemm_kernels.h): the dots over image
// features packed in 12-row slivers and text features in 32-column panels, K cut to the L1 size
// read at run time; the two updates read G packed as slivers (and its transpose beside it) and the
// features in 32-column panels, accumulating the gradients in the same layout. Elsewhere (or with
// the GEMM's level forced below AVX-512) a portable register block: 8 rows x 32 columns, 16 vector
// accumulators. Features are copied to float32 first (any input dtype), padded with zeros to
// whole tiles and to 32 feature columns.
#include "cpu/contrastive.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/cpu_info.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"
#include "cpu/gemm_pack.h"

// The extension is built as ISO C++17, which turns off fusing a * b + c into one FMA; the
// micro-kernels below are written for it.
#pragma GCC optimize("fp-contract=fast")
#include "common/vec16.h"  // after the pragma: its helpers are compiled with it too

namespace vlmfast::cpu {
namespace {

constexpr int64_t kMR = 8;     // output rows of a register block (8 beat 6 and 12 here)
constexpr int64_t kNR = 32;    // output columns of a register block: two 16-float vectors
constexpr int64_t kTile = 96;  // rows = columns of a cache tile; a multiple of kMR and kNR
constexpr int64_t kKC = 256;   // depth of one sweep over a packed panel: kKC x kNR floats = 32 KiB (L1)
constexpr int64_t kSliver = 12;  // rows of the AVX-512 micro-kernel; kTile holds 8 slivers
static_assert(kTile % kSliver == 0 && kTile % kNR == 0 && kTile % 16 == 0, "whole slivers, panels, vectors");

const float kNegInf = -std::numeric_limits<float>::infinity();

VLMFAST_INLINE v16f vabs(v16f x) { return x < 0.0f ? -x : x; }
VLMFAST_INLINE float hmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}
// Lanes j0 .. j0 + 15 that are real columns (< B): padding columns must not enter any sum.
VLMFAST_INLINE v16i lanes_below(int64_t j0, int64_t B) {
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return (lane + static_cast<int32_t>(j0)) < static_cast<int32_t>(B);
}

// log(1 + e) for e in [0, 1]: 2 atanh(u) with u = e / (2 + e) <= 1/3, odd series to u^15
// (truncation < 1e-9); accurate for tiny e too, where it tends to e.
VLMFAST_INLINE v16f vlog1p_unit(v16f e) {
  v16f u = e / (e + 2.0f);
  v16f u2 = u * u;
  v16f p = splat(1.0f / 15.0f);
  p = p * u2 + 1.0f / 13.0f;
  p = p * u2 + 1.0f / 11.0f;
  p = p * u2 + 1.0f / 9.0f;
  p = p * u2 + 1.0f / 7.0f;
  p = p * u2 + 1.0f / 5.0f;
  p = p * u2 + 1.0f / 3.0f;
  p = p * u2 + 1.0f;
  return 2.0f * u * p;
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), without overflow.
VLMFAST_INLINE v16f vsoftplus(v16f x) {
  return vmax(x, splat(0.0f)) + vlog1p_unit(vexp(-vabs(x)));
}

// sigmoid(x) from e^-|x| (never overflows).
VLMFAST_INLINE v16f vsigmoid(v16f x) {
  v16f e = vexp(-vabs(x));
  v16f inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

// ----------------------------------------------------------------------------- operands

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The features as the kernels read them: float32, zero-padded to Bp = whole tiles of rows and to
// Dp = whole 32-float panels of columns (zeros change no dot product).
struct Operands {
  int64_t B = 0, D = 0, Bp = 0, Dp = 0;
  std::vector<float> a;   // (Bp, Dp) image features
  std::vector<float> b;   // (Bp, Dp) text features
  std::vector<float> bt;  // b^T packed in panels of kNR columns: panel p, depth k, column c at
                          // bt[(p * D + k) * kNR + c] = b[p * kNR + c][k]; a panel streams through K1
  std::vector<float> ap;  // AVX-512 path: a in 12-row slivers, ap[((i / 12) * Dp + k) * 12 + i % 12]
  // AVX-512 backward: a and b in column panels, x[i][d] at ((d / 32) * Bp + i) * 32 + d % 32, the
  // B operands of the two updates (a tile's rows of one panel: 96 x 128 contiguous bytes). Read in
  // place instead, rows Dp floats apart (2 KiB at D = 512) fall into 4 of L1's 64 sets and the
  // 12 KiB block is re-read from L2 by every sliver (the updates ran at ~55 % of the kernel's peak).
  // a and b themselves are then released.
  std::vector<float> ac, bc;
};

// Index of x[i][d] in the column-panel layout of Bp rows (ac, bc and the AVX-512 gradients).
VLMFAST_INLINE int64_t panel_index(int64_t i, int64_t d, int64_t Bp) {
  return ((d / kNR) * Bp + i) * kNR + d % kNR;
}

template <typename T>
VLMFAST_INLINE void copy_row(const T* src, int64_t D, float* dst) {
  for (int64_t k = 0; k < D; ++k) dst[k] = to_float(src[k]);
}

// One parallel loop over panels of kNR rows: convert the panel's rows of a and b to float32 and
// pack the same rows of b as a panel of b^T (one pass, no barrier between the steps).
#if VLMFAST_GEMM_X86
VLMFAST_TARGET_AVX512 void pack_sliver_block(Operands& o, int64_t m0) {
  gemm_pack::pack_a_f32_rows12(o.a.data(), o.Dp, m0, kTile, 0, o.Dp, o.ap.data() + m0 * o.Dp);
}
#endif

// ap from a, kTile rows per task (the GEMM's vectorised sliver packing).
void pack_slivers(Operands& o, int threads) {
  o.ap.assign(o.Bp * o.Dp, 0.0f);
#if VLMFAST_GEMM_X86
  const int64_t blocks = o.Bp / kTile;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t q = 0; q < blocks; ++q) pack_sliver_block(o, q * kTile);
#endif
}

// ac, bc from a, b (whole 32-float chunks of a row), then a and b released.
void to_column_panels(Operands& o, int threads) {
  o.ac.resize(o.Bp * o.Dp);
  o.bc.resize(o.Bp * o.Dp);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < o.Bp; ++i)
    for (int64_t d = 0; d < o.Dp; d += kNR) {
      std::copy_n(o.a.data() + i * o.Dp + d, kNR, o.ac.data() + panel_index(i, d, o.Bp));
      std::copy_n(o.b.data() + i * o.Dp + d, kNR, o.bc.data() + panel_index(i, d, o.Bp));
    }
  std::vector<float>().swap(o.a);
  std::vector<float>().swap(o.b);
}

template <typename T>
Operands prepare(const PairShape& s, const void* a, const void* b, bool slivers, bool backward,
                 int threads) {
  Operands o;
  o.B = s.B;
  o.D = s.D;
  o.Bp = round_up(s.B, kTile);
  o.Dp = round_up(s.D, kNR);
  o.a.assign(o.Bp * o.Dp, 0.0f);
  o.b.assign(o.Bp * o.Dp, 0.0f);
  o.bt.assign(o.Bp * o.D, 0.0f);
  const T* a_in = static_cast<const T*>(a);
  const T* b_in = static_cast<const T*>(b);
  const int64_t panels = o.Bp / kNR;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t i = p * kNR; i < std::min((p + 1) * kNR, o.B); ++i) {
      copy_row(a_in + i * s.a_stride, o.D, o.a.data() + i * o.Dp);
      copy_row(b_in + i * s.b_stride, o.D, o.b.data() + i * o.Dp);
    }
    for (int64_t k = 0; k < o.D; ++k)
      for (int64_t c = 0; c < kNR; ++c)
        o.bt[(p * o.D + k) * kNR + c] = o.b[(p * kNR + c) * o.Dp + k];
  }
  if (slivers) pack_slivers(o, threads);
  if (slivers && backward) to_column_panels(o, threads);
  return o;
}

// Whether the tiles run the AVX-512 micro-kernel: the CPU has it and the GEMM's level (forced
// lower in tests and comparisons) allows it.
bool use_avx512() {
#if VLMFAST_GEMM_X86
  return gemm_isa() >= GemmIsa::Avx512;
#else
  return false;
#endif
}

// backward: the operands of a backward (on the AVX-512 path, column panels for the updates).
Operands prepare_any(const PairShape& s, const void* a, const void* b, int dtype, bool backward,
                     int threads) {
  const bool slivers = use_avx512();
  switch (dtype_from_tag(dtype)) {
    case DType::Float16: return prepare<Half>(s, a, b, slivers, backward, threads);
    case DType::BFloat16: return prepare<BFloat16>(s, a, b, slivers, backward, threads);
    default: return prepare<float>(s, a, b, slivers, backward, threads);
  }
}

// The end of a backward, one parallel loop over rows: sum the threads' partials of d b (threads x
// Bp x Dp) and store multiplier * d a and multiplier * d b as (B, D) in T. The partials are in
// column panels where the operands are (o.ac set: the AVX-512 path), else (Bp, Dp) row-major.
template <typename T>
void store_grads(const float* da, const float* db_partials, int64_t n, int nthreads,
                 const Operands& o, float multiplier, void* grad_a, void* grad_b, int threads) {
  T* out_a = static_cast<T*>(grad_a);
  T* out_b = static_cast<T*>(grad_b);
  const bool panels = !o.ac.empty();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < o.B; ++i)
    for (int64_t k = 0; k < o.D; ++k) {
      const int64_t at = panels ? panel_index(i, k, o.Bp) : i * o.Dp + k;
      float sum = 0.0f;
      for (int t = 0; t < nthreads; ++t) sum += db_partials[t * n + at];
      out_a[i * o.D + k] = from_float<T>(multiplier * da[at]);
      out_b[i * o.D + k] = from_float<T>(multiplier * sum);
    }
}

void store_grads_any(const float* da, const float* db_partials, int64_t n, int nthreads,
                     const Operands& o, float multiplier, void* grad_a, void* grad_b, int dtype) {
  switch (dtype_from_tag(dtype)) {
    case DType::Float16:
      return store_grads<Half>(da, db_partials, n, nthreads, o, multiplier, grad_a, grad_b, nthreads);
    case DType::BFloat16:
      return store_grads<BFloat16>(da, db_partials, n, nthreads, o, multiplier, grad_a, grad_b, nthreads);
    default:
      return store_grads<float>(da, db_partials, n, nthreads, o, multiplier, grad_a, grad_b, nthreads);
  }
}

// Threads worth starting: one per block of kTile rows at most (a thread with no block would only
// wait at the barriers, which costs a scheduler time slice on a busy machine).
int useful_threads(int threads, int64_t B) {
  const int64_t blocks = round_up(B, kTile) / kTile;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(resolve_threads(threads), blocks)));
}

// ----------------------------------------------------------------------------- micro-kernels

// K1: s[r][c] (+)= sum_{k0 <= k < k1} a[r][k] * panel[k][c] for kMR rows r, kNR columns c.
// Per k: two vector loads of the panel, kMR broadcasts of a, 2 kMR FMAs into registers.
VLMFAST_INLINE void dot_block(const float* a, int64_t lda, const float* panel, int64_t k0,
                              int64_t k1, float* s, bool accumulate) {
  v16f acc[kMR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = accumulate ? vload(s + r * kTile) : splat(0.0f);
    acc[r][1] = accumulate ? vload(s + r * kTile + 16) : splat(0.0f);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const v16f b0 = vload(panel + k * kNR), b1 = vload(panel + k * kNR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const float x = a[r * lda + k];
      acc[r][0] += b0 * x;
      acc[r][1] += b1 * x;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    vstore(s + r * kTile, acc[r][0]);
    vstore(s + r * kTile + 16, acc[r][1]);
  }
}

// S (kTile x kTile, row stride kTile) = a[i0 : i0 + kTile] . b[j0 : j0 + kTile]^T, the raw dots.
// k is cut into kKC slices so the panel slice stays in L1 while every row block of the tile uses it.
VLMFAST_INLINE void dot_tile(const Operands& o, int64_t i0, int64_t j0, float* S) {
  for (int64_t k0 = 0; k0 < o.D; k0 += kKC) {
    const int64_t k1 = std::min(o.D, k0 + kKC);
    for (int64_t p = 0; p < kTile / kNR; ++p) {
      const float* panel = o.bt.data() + (j0 / kNR + p) * o.D * kNR;
      for (int64_t r0 = 0; r0 < kTile; r0 += kMR)
        dot_block(o.a.data() + (i0 + r0) * o.Dp, o.Dp, panel, k0, k1, S + r0 * kTile + p * kNR,
                  k0 > 0);
    }
  }
}

// K2/K3: out[r][0 : 16 NV] += sum_{m < n} g(r, m) x[m][0 : 16 NV] for kMR rows r, where
// g(r, m) = G[r * g_row + m * g_col]. With g_row = kTile, g_col = 1 it is G x (d a += G b);
// with g_row = 1, g_col = kTile it is G^T x (d b += G^T a).
template <int NV>
VLMFAST_INLINE void gemm_block(const float* G, int64_t g_row, int64_t g_col, int64_t n,
                               const float* x, int64_t ldx, float* out, int64_t ldo) {
  v16f acc[kMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(out + r * ldo + 16 * v);
  for (int64_t m = 0; m < n; ++m) {
    v16f xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = vload(x + m * ldx + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const float g = G[r * g_row + m * g_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += xv[v] * g;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < NV; ++v) vstore(out + r * ldo + 16 * v, acc[r][v]);
}

// out rows [0, rows) (rounded up to kMR; the extra rows of G are zero) += g(r, m) x[m], m < n,
// over all Dp feature columns.
VLMFAST_INLINE void gemm_rows(const float* G, int64_t g_row, int64_t g_col, int64_t rows, int64_t n,
                              const float* x, float* out, int64_t Dp) {
  for (int64_t d0 = 0; d0 < Dp; d0 += 2 * 16) {
    const bool pair = d0 + 32 <= Dp;
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const float* g = G + r0 * g_row;
      if (pair)
        gemm_block<2>(g, g_row, g_col, n, x + d0, Dp, out + r0 * Dp + d0, Dp);
      else
        gemm_block<1>(g, g_row, g_col, n, x + d0, Dp, out + r0 * Dp + d0, Dp);
    }
  }
}

// d a[I] += G b[J] and d b[J] += G^T a[I] for the tile (i0, j0) whose G is given.
VLMFAST_INLINE void backward_updates(const Operands& o, int64_t i0, int64_t j0, const float* G,
                                     float* grad_a, float* grad_b_partial) {
  const int64_t rows = std::min(kTile, o.B - i0), cols = std::min(kTile, o.B - j0);
  gemm_rows(G, kTile, 1, rows, cols, o.b.data() + j0 * o.Dp, grad_a + i0 * o.Dp, o.Dp);
  gemm_rows(G, 1, kTile, cols, rows, o.a.data() + i0 * o.Dp, grad_b_partial + j0 * o.Dp, o.Dp);
}

// sum_ij G_ij S_ij (and sum_ij G_ij) over the tile.
VLMFAST_INLINE void tile_sums(const float* G, const float* S, double* g_dot, double* g_sum) {
  v16f acc_dot = splat(0.0f), acc_sum = splat(0.0f);
  for (int64_t e = 0; e < kTile * kTile; e += 16) {
    const v16f g = vload(G + e);
    acc_dot += g * vload(S + e);
    acc_sum += g;
  }
  *g_dot += hsum(acc_dot);
  *g_sum += hsum(acc_sum);
}

#if VLMFAST_GEMM_X86
// The AVX-512 versions of dot_tile and backward_updates, on the 12 x 32 micro-kernel.

// Depth of one sweep: the panel slice (kc x 32 floats) takes half of L1d.
int64_t dot_depth() {
  static const int64_t kc = std::max<int64_t>(64, cache_sizes().l1d / 2 / (kNR * 4) / 16 * 16);
  return kc;
}

VLMFAST_TARGET_AVX512 inline void dot_tile_avx512(const Operands& o, int64_t i0, int64_t j0,
                                                          float* S) {
  const int64_t kc = dot_depth();
  for (int64_t k0 = 0; k0 < o.D; k0 += kc) {
    const int64_t kb = std::min(kc, o.D - k0);
    for (int64_t p = 0; p < kTile / kNR; ++p) {
      const float* panel = o.bt.data() + ((j0 / kNR + p) * o.D + k0) * kNR;
      for (int64_t q = 0; q < kTile / kSliver; ++q)
        gemm_kernels::Avx512::run(o.ap.data() + ((i0 / kSliver + q) * o.Dp + k0) * kSliver, panel, kb,
                                  S + q * kSliver * kTile + p * kNR, kTile, k0 > 0);
    }
  }
}

// G packed twice as A slivers of the two updates (GP: scratch of 2 kTile^2 floats):
//   d a[I] += G b[J]:   A(i, j) = G[i][j], slivers of 12 rows i over steps j (a 12 x 16 transpose
//                       per step block, the GEMM's packing);
//   d b[J] += G^T a[I]: A(j, i) = G[i][j], slivers of 12 columns j over steps i (12 contiguous
//                       floats of each row of G).
// A sliver (kTile x 12 floats, 4.5 KiB) then stays in L1 while the feature rows stream past; read
// in place, G's strided rows would take all of L1.
VLMFAST_TARGET_AVX512 inline void pack_g(const float* G, float* GP) {
  gemm_pack::pack_a_f32_rows12(G, kTile, 0, kTile, 0, kTile, GP);
  float* by_col = GP + kTile * kTile;
  for (int64_t q = 0; q < kTile / kSliver; ++q)
    for (int64_t i = 0; i < kTile; ++i)
      _mm512_mask_storeu_ps(by_col + (q * kTile + i) * kSliver, 0x0fff,
                            _mm512_maskz_loadu_ps(0x0fff, G + i * kTile + q * kSliver));
}

// The two updates over packed G; B = the tile's feature rows of one column panel (ac, bc: 12 KiB
// contiguous), kept in L1 while the tile's slivers pass; the gradients in column panels too, so a
// sliver's C tile is 1.5 KiB contiguous.
VLMFAST_TARGET_AVX512 inline void backward_updates_avx512(const Operands& o, int64_t i0, int64_t j0,
                                                          const float* GP, float* grad_a,
                                                          float* grad_b_partial) {
  const int64_t rows = std::min(kTile, o.B - i0), cols = std::min(kTile, o.B - j0);
  const int64_t row_slivers = (rows + kSliver - 1) / kSliver, col_slivers = (cols + kSliver - 1) / kSliver;
  const float* by_col = GP + kTile * kTile;
  for (int64_t d0 = 0; d0 < o.Dp; d0 += kNR) {
    const float* b_rows = o.bc.data() + panel_index(j0, d0, o.Bp);
    const float* a_rows = o.ac.data() + panel_index(i0, d0, o.Bp);
    for (int64_t q = 0; q < row_slivers; ++q)
      gemm_kernels::Avx512::run_strided(GP + q * kTile * kSliver, kSliver, b_rows, kNR, cols,
                                        grad_a + panel_index(i0 + q * kSliver, d0, o.Bp), kNR, true);
    for (int64_t q = 0; q < col_slivers; ++q)
      gemm_kernels::Avx512::run_strided(by_col + q * kTile * kSliver, kSliver, a_rows, kNR, rows,
                                        grad_b_partial + panel_index(j0 + q * kSliver, d0, o.Bp), kNR,
                                        true);
  }
}
#endif

// The tile functions' choice of kernels: AVX512 = the micro-kernel above (GP: 2 kTile^2 floats of
// scratch for the packed G).
template <bool AVX512>
VLMFAST_INLINE void dot_tile_any(const Operands& o, int64_t i0, int64_t j0, float* S) {
#if VLMFAST_GEMM_X86
  if constexpr (AVX512) return dot_tile_avx512(o, i0, j0, S);
#endif
  dot_tile(o, i0, j0, S);
}

template <bool AVX512>
VLMFAST_INLINE void backward_updates_any(const Operands& o, int64_t i0, int64_t j0, const float* G,
                                         float* GP, float* grad_a, float* grad_b_partial) {
#if VLMFAST_GEMM_X86
  if constexpr (AVX512) {
    pack_g(G, GP);
    return backward_updates_avx512(o, i0, j0, GP, grad_a, grad_b_partial);
  }
#endif
  (void)GP;
  backward_updates(o, i0, j0, G, grad_a, grad_b_partial);
}

// ----------------------------------------------------------------------------- tiles

// Forward of one InfoNCE tile: online update of the row stats (row_m, row_s: the tile's rows) and
// of this thread's column stats (col_m, col_s: the tile's columns); the diagonal logits l_ii the
// tile holds go to diag (indexed by i). S is scratch.
template <bool AVX512>
VLMFAST_INLINE void infonce_forward_tile(const Operands& o, int64_t i0, int64_t j0, float scale,
                                         float* S, float* row_m, float* row_s, float* col_m,
                                         float* col_s, float* diag) {
  dot_tile_any<AVX512>(o, i0, j0, S);
  const int64_t rows = std::min(kTile, o.B - i0);
  // Logits; the padding columns become -inf so they vanish from every max and sum.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < kTile; c += 16)
      vstore(S + r * kTile + c,
             lanes_below(j0 + c, o.B) ? vload(S + r * kTile + c) * scale : splat(kNegInf));
  for (int64_t i = std::max(i0, j0); i < std::min({i0 + rows, j0 + kTile, o.B}); ++i)
    diag[i] = S[(i - i0) * kTile + (i - j0)];
  // Rows: R_i = m + log(sum_j exp(l_ij - m)), m the running max (finite: every tile has a column).
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = S + r * kTile;
    v16f mx = splat(kNegInf);
    for (int64_t c = 0; c < kTile; c += 16) mx = vmax(mx, vload(row + c));
    const float m_new = std::max(row_m[r], hmax(mx));
    v16f sum = splat(0.0f);
    for (int64_t c = 0; c < kTile; c += 16) sum += vexp(vload(row + c) - m_new);
    row_s[r] = row_s[r] * std::exp(row_m[r] - m_new) + hsum(sum);
    row_m[r] = m_new;
  }
  // Columns, 16 at a time, over the tile's real rows.
  for (int64_t c = 0; c < kTile; c += 16) {
    v16f mx = splat(kNegInf);
    for (int64_t r = 0; r < rows; ++r) mx = vmax(mx, vload(S + r * kTile + c));
    const v16f m_old = vload(col_m + c), m_new = vmax(m_old, mx);
    v16f sum = splat(0.0f);
    for (int64_t r = 0; r < rows; ++r) sum += vexp(vload(S + r * kTile + c) - m_new);
    vstore(col_s + c, vload(col_s + c) * vexp(m_old - m_new) + sum);
    vstore(col_m + c, m_new);
  }
}

// Backward of one InfoNCE tile: G_ij = coef (exp(l_ij - R_i) + exp(l_ij - C_j) - 2 [i == j]),
// coef = g / (2B), zero outside the B x B block; then the two gradient updates.
template <bool AVX512>
VLMFAST_INLINE void infonce_backward_tile(const Operands& o, int64_t i0, int64_t j0, float scale,
                                          const float* row_lse, const float* col_lse, float coef,
                                          float* S, float* G, float* GP, float* grad_a,
                                          float* grad_b_partial, double* grad_scale) {
  dot_tile_any<AVX512>(o, i0, j0, S);
  const int64_t rows = std::min(kTile, o.B - i0);
  for (int64_t r = 0; r < kTile; ++r) {
    if (r >= rows) {
      for (int64_t c = 0; c < kTile; c += 16) vstore(G + r * kTile + c, splat(0.0f));
      continue;
    }
    const float R = row_lse[i0 + r];
    for (int64_t c = 0; c < kTile; c += 16) {
      const v16f l = vload(S + r * kTile + c) * scale;
      const v16f g = coef * (vexp(l - R) + vexp(l - vload(col_lse + j0 + c)));
      vstore(G + r * kTile + c, lanes_below(j0 + c, o.B) ? g : splat(0.0f));
    }
  }
  for (int64_t i = std::max(i0, j0); i < std::min({i0 + rows, j0 + kTile, o.B}); ++i)
    G[(i - i0) * kTile + (i - j0)] -= 2.0f * coef;
  double unused = 0.0;
  tile_sums(G, S, grad_scale, &unused);
  backward_updates_any<AVX512>(o, i0, j0, G, GP, grad_a, grad_b_partial);
}

// Sum over one SigLIP tile of softplus(l_ij) off the diagonal and softplus(-l_ii) on it.
template <bool AVX512>
VLMFAST_INLINE double siglip_forward_tile(const Operands& o, int64_t i0, int64_t j0, float scale,
                                          float bias, float* S) {
  dot_tile_any<AVX512>(o, i0, j0, S);
  const int64_t rows = std::min(kTile, o.B - i0);
  v16f acc = splat(0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < kTile; c += 16) {
      const v16f l = vload(S + r * kTile + c) * scale + bias;
      acc += lanes_below(j0 + c, o.B) ? vsoftplus(l) : splat(0.0f);
    }
  double total = hsum(acc);
  // softplus(-l) = softplus(l) - l turns the diagonal's term into its positive-pair one.
  for (int64_t i = std::max(i0, j0); i < std::min({i0 + rows, j0 + kTile, o.B}); ++i)
    total -= static_cast<double>(S[(i - i0) * kTile + (i - j0)] * scale + bias);
  return total;
}

// Backward of one SigLIP tile: G_ij = coef sigmoid(l_ij) - coef [i == j], coef = g / B. With
// loss set, the tile's loss terms (siglip_forward_tile's sum) are added to it from the same logits,
// so a caller that needs the loss and its gradient pays for the dots once (6 B^2 D flops, not 8).
template <bool AVX512>
VLMFAST_INLINE void siglip_backward_tile(const Operands& o, int64_t i0, int64_t j0, float scale,
                                         float bias, float coef, float* S, float* G, float* GP,
                                         float* grad_a, float* grad_b_partial, double* grad_scale,
                                         double* grad_bias, double* loss) {
  dot_tile_any<AVX512>(o, i0, j0, S);
  const int64_t rows = std::min(kTile, o.B - i0);
  v16f loss_acc = splat(0.0f);
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t c = 0; c < kTile; c += 16) {
      const v16f l = vload(S + r * kTile + c) * scale + bias;
      if (r >= rows) {
        vstore(G + r * kTile + c, splat(0.0f));
        continue;
      }
      const v16i real = lanes_below(j0 + c, o.B);
      vstore(G + r * kTile + c, real ? coef * vsigmoid(l) : splat(0.0f));
      if (loss != nullptr) loss_acc += real ? vsoftplus(l) : splat(0.0f);
    }
  for (int64_t i = std::max(i0, j0); i < std::min({i0 + rows, j0 + kTile, o.B}); ++i) {
    G[(i - i0) * kTile + (i - j0)] -= coef;
    // softplus(-l) = softplus(l) - l: the diagonal's positive-pair term, as in the forward.
    if (loss != nullptr) *loss -= static_cast<double>(S[(i - i0) * kTile + (i - j0)] * scale + bias);
  }
  if (loss != nullptr) *loss += hsum(loss_acc);
  tile_sums(G, S, grad_scale, grad_bias);
  backward_updates_any<AVX512>(o, i0, j0, G, GP, grad_a, grad_b_partial);
}

// Each tile function compiled twice: multi-versioned on the portable block, and for AVX-512 on
// the micro-kernel; the drivers pick one per call (Tiles).
#define VLMFAST_TILE_PAIR(NAME, RET, PARAMS, ARGS)                         \
  VLMFAST_MULTIVERSION RET NAME##_portable PARAMS { return NAME<false> ARGS; } \
  VLMFAST_TILE_AVX512(RET NAME##_avx512 PARAMS { return NAME<true> ARGS; })
#if VLMFAST_GEMM_X86
#define VLMFAST_TILE_AVX512(...) VLMFAST_TARGET_AVX512 __VA_ARGS__
#else
#define VLMFAST_TILE_AVX512(...)
#endif
VLMFAST_TILE_PAIR(infonce_forward_tile, void,
                  (const Operands& o, int64_t i0, int64_t j0, float scale, float* S, float* row_m,
                   float* row_s, float* col_m, float* col_s, float* diag),
                  (o, i0, j0, scale, S, row_m, row_s, col_m, col_s, diag))
VLMFAST_TILE_PAIR(infonce_backward_tile, void,
                  (const Operands& o, int64_t i0, int64_t j0, float scale, const float* row_lse,
                   const float* col_lse, float coef, float* S, float* G, float* GP, float* grad_a,
                   float* grad_b_partial, double* grad_scale),
                  (o, i0, j0, scale, row_lse, col_lse, coef, S, G, GP, grad_a, grad_b_partial, grad_scale))
VLMFAST_TILE_PAIR(siglip_forward_tile, double,
                  (const Operands& o, int64_t i0, int64_t j0, float scale, float bias, float* S),
                  (o, i0, j0, scale, bias, S))
VLMFAST_TILE_PAIR(siglip_backward_tile, void,
                  (const Operands& o, int64_t i0, int64_t j0, float scale, float bias, float coef,
                   float* S, float* G, float* GP, float* grad_a, float* grad_b_partial,
                   double* grad_scale, double* grad_bias, double* loss),
                  (o, i0, j0, scale, bias, coef, S, G, GP, grad_a, grad_b_partial, grad_scale, grad_bias,
                   loss))
#undef VLMFAST_TILE_PAIR
#undef VLMFAST_TILE_AVX512

// The four tile functions of one call.
struct Tiles {
  decltype(&infonce_forward_tile_portable) infonce_forward;
  decltype(&infonce_backward_tile_portable) infonce_backward;
  decltype(&siglip_forward_tile_portable) siglip_forward;
  decltype(&siglip_backward_tile_portable) siglip_backward;
};

Tiles tiles_for(const Operands& o) {
#if VLMFAST_GEMM_X86
  if (!o.ap.empty())
    return {infonce_forward_tile_avx512, infonce_backward_tile_avx512, siglip_forward_tile_avx512,
            siglip_backward_tile_avx512};
#endif
  (void)o;
  return {infonce_forward_tile_portable, infonce_backward_tile_portable, siglip_forward_tile_portable,
          siglip_backward_tile_portable};
}

// ----------------------------------------------------------------------------- drivers

}  // namespace

double infonce_forward(const PairShape& shape, const void* a, const void* b, float scale,
                       float* row_lse, float* col_lse, int dtype, int threads) {
  const int nthreads = useful_threads(threads, shape.B);
  const Operands o = prepare_any(shape, a, b, dtype, false, nthreads);
  const int64_t Bp = o.Bp, blocks = Bp / kTile;
  std::vector<float> col_m(nthreads * Bp, kNegInf), col_s(nthreads * Bp, 0.0f);
  // The loss terms R_i - l_ii and C_j - l_jj are formed as (max - l_ii) + log(sum) from the very
  // float values the tiles used, before R_i is rounded: near a loss of 0 (R_i ~ l_ii ~ scale)
  // subtracting rounded sums would lose all the digits that matter.
  std::vector<float> diag(Bp, 0.0f), row_term(Bp, 0.0f);
  const Tiles tiles = tiles_for(o);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = thread_index();
    std::vector<float> S(kTile * kTile);
    float row_m[kTile], row_s[kTile];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ib = 0; ib < blocks; ++ib) {
      const int64_t i0 = ib * kTile;
      std::fill(row_m, row_m + kTile, kNegInf);
      std::fill(row_s, row_s + kTile, 0.0f);
      for (int64_t j0 = 0; j0 < o.B; j0 += kTile)
        tiles.infonce_forward(o, i0, j0, scale, S.data(), row_m, row_s, col_m.data() + t * Bp + j0,
                              col_s.data() + t * Bp + j0, diag.data());
      for (int64_t r = 0; r < std::min(kTile, o.B - i0); ++r) {
        row_lse[i0 + r] = row_m[r] + std::log(row_s[r]);
        row_term[i0 + r] = (row_m[r] - diag[i0 + r]) + std::log(row_s[r]);
      }
    }
  }
  // Merge the threads' column stats: C_j = M + log(sum_t s_t exp(m_t - M)), M = max_t m_t.
  double total = 0.0;
  for (int64_t j = 0; j < o.B; ++j) {
    float m = kNegInf;
    for (int t = 0; t < nthreads; ++t) m = std::max(m, col_m[t * Bp + j]);
    float s = 0.0f;
    for (int t = 0; t < nthreads; ++t)
      if (col_s[t * Bp + j] > 0.0f) s += col_s[t * Bp + j] * std::exp(col_m[t * Bp + j] - m);
    col_lse[j] = m + std::log(s);
    total += static_cast<double>(row_term[j]) + ((m - diag[j]) + std::log(s));
  }
  return total / (2.0 * o.B);
}

double infonce_backward(const PairShape& shape, const void* a, const void* b, float scale,
                        const float* row_lse, const float* col_lse, float grad, void* grad_a,
                        void* grad_b, int dtype, int threads) {
  const int nthreads = useful_threads(threads, shape.B);
  const Operands o = prepare_any(shape, a, b, dtype, true, nthreads);
  const int64_t Bp = o.Bp, n = Bp * o.Dp, blocks = Bp / kTile;
  // Padded copies so a tile's vector loads never leave the arrays (padding lanes are masked).
  std::vector<float> R(Bp, 0.0f), C(Bp, 0.0f);
  std::copy(row_lse, row_lse + o.B, R.begin());
  std::copy(col_lse, col_lse + o.B, C.begin());
  std::vector<float> da(n, 0.0f), db(static_cast<size_t>(nthreads) * n, 0.0f);
  std::vector<double> dscale(nthreads, 0.0);
  const float coef = grad / (2.0f * static_cast<float>(o.B));
  const Tiles tiles = tiles_for(o);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = thread_index();
    std::vector<float> S(kTile * kTile), G(kTile * kTile), GP(2 * kTile * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ib = 0; ib < blocks; ++ib)
      for (int64_t j0 = 0; j0 < o.B; j0 += kTile)
        tiles.infonce_backward(o, ib * kTile, j0, scale, R.data(), C.data(), coef, S.data(), G.data(),
                               GP.data(), da.data(), db.data() + t * n, &dscale[t]);
  }
  store_grads_any(da.data(), db.data(), n, nthreads, o, scale, grad_a, grad_b, dtype);
  double total = 0.0;
  for (double v : dscale) total += v;
  return total;
}

double siglip_forward(const PairShape& shape, const void* a, const void* b, float scale, float bias,
                      int dtype, int threads) {
  const int nthreads = useful_threads(threads, shape.B);
  const Operands o = prepare_any(shape, a, b, dtype, false, nthreads);
  const int64_t blocks = o.Bp / kTile;
  double total = 0.0;
  const Tiles tiles = tiles_for(o);
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
    std::vector<float> S(kTile * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ib = 0; ib < blocks; ++ib)
      for (int64_t j0 = 0; j0 < o.B; j0 += kTile)
        total += tiles.siglip_forward(o, ib * kTile, j0, scale, bias, S.data());
  }
  return total / static_cast<double>(o.B);
}

void siglip_backward(const PairShape& shape, const void* a, const void* b, float scale, float bias,
                     float grad, void* grad_a, void* grad_b, double* grad_scale_bias, int dtype,
                     int threads, double* loss) {
  const int nthreads = useful_threads(threads, shape.B);
  const Operands o = prepare_any(shape, a, b, dtype, true, nthreads);
  const int64_t n = o.Bp * o.Dp, blocks = o.Bp / kTile;
  std::vector<float> da(n, 0.0f), db(static_cast<size_t>(nthreads) * n, 0.0f);
  std::vector<double> dscale(nthreads, 0.0), dbias(nthreads, 0.0), losses(nthreads, 0.0);
  const float coef = grad / static_cast<float>(o.B);
  const Tiles tiles = tiles_for(o);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = thread_index();
    std::vector<float> S(kTile * kTile), G(kTile * kTile), GP(2 * kTile * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ib = 0; ib < blocks; ++ib)
      for (int64_t j0 = 0; j0 < o.B; j0 += kTile)
        tiles.siglip_backward(o, ib * kTile, j0, scale, bias, coef, S.data(), G.data(), GP.data(),
                              da.data(), db.data() + t * n, &dscale[t], &dbias[t],
                              loss != nullptr ? &losses[t] : nullptr);
  }
  store_grads_any(da.data(), db.data(), n, nthreads, o, scale, grad_a, grad_b, dtype);
  grad_scale_bias[0] = grad_scale_bias[1] = 0.0;
  double total = 0.0;
  for (int t = 0; t < nthreads; ++t) {
    grad_scale_bias[0] += dscale[t];
    grad_scale_bias[1] += dbias[t];
    total += losses[t];
  }
  if (loss != nullptr) *loss = total / static_cast<double>(o.B);
}

}  // namespace vlmfast::cpu
