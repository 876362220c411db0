// Fused linear + cross-entropy on the CPU, in O(N D + V D + V R) memory.
//
// The maths, for one row with logits z (V,), label y, label smoothing eps and row scale s:
//   lse = log sum_v exp(z_v),   loss = lse - (1 - eps) z_y - eps / V sum_v z_v,
//   G_v = s * d loss / d z_v = s (softmax_v - (1 - eps) [v == y] - eps / V),
//   d hidden = G W,   d W = G^T hidden,   d bias = sum over rows of G.
//
// The work (Liger-Kernel's order: the gradients are formed while the logits are at hand, so the
// logits GEMM runs once). Rows go in blocks of R. Each thread owns a fixed range of the vocabulary
// for the whole call. For a block it computes the logits of the block's rows against its
// vocabulary rows into LT, a (V, R) buffer (transposed: one vocabulary row per line, so the
// per-row statistics below are vector loops over rows), keeping per row a running (max, sum of
// exp, sum of logits) (online log-sum-exp). The threads' partials are merged per row into lse and
// the loss. With gradients, each thread turns its lines of LT into G in place and adds G^T hidden
// into its own rows of a float32 d W (ownership never changes, so no races and no per-thread
// copies), then the threads split the feature dim to form d hidden = G W for the block.
//
// Every product runs through one register block: kMR output rows x kNR = 32 columns (two 16-float
// vectors), 12 vector accumulators, one broadcast and two FMAs per loaded pair; operands are read
// through (row, depth) strides so the three GEMMs share it without repacking G.
#include "cpu/linear_cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
// bfloat16 inputs on CPUs with AVX512-BF16: the three GEMMs take bf16 operands two depths at a
// time (vdpbf16ps: twice the products per instruction of float32 FMAs), accumulating in float32.
#define LCE_BF16_DOTS 1
#define LCE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#endif

#include "common/dtype.h"
#include "common/parallel.h"

// ISO C++17 builds do not fuse a * b + c into one FMA; the micro-kernel is written for it.
#pragma GCC optimize("fp-contract=fast")
#include "common/vec16.h"  // after the pragma: its helpers are compiled with it too

namespace vlmfast::cpu {
namespace {

constexpr int64_t kMR = 6;     // output rows of the register block
constexpr int64_t kNR = 32;    // output columns of the register block
constexpr int64_t kUnit = 96;  // rows of a logit block and vocabulary rows per thread share: a
                               // multiple of kMR, kNR and 16 (one vector of rows)
constexpr int64_t kKC = 256;   // vocabulary depth of one d hidden sweep: kKC x kNR floats = 32 KiB
constexpr int64_t kLogitBudget = int64_t(1) << 24;  // floats in LT (64 MiB) before R stops growing

// C[r][c] (+)= sum_{k < K} A[r * ars + k * aks] * B[k * bks + c] for r < kMR, c < kNR.
VLMFAST_INLINE void micro_kernel(const float* A, int64_t ars, int64_t aks, const float* B, int64_t bks,
                             int64_t K, float* C, int64_t ldc, bool accumulate) {
  v16f acc[kMR][2];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = accumulate ? vload(C + r * ldc) : splat(0.0f);
    acc[r][1] = accumulate ? vload(C + r * ldc + 16) : splat(0.0f);
  }
  for (int64_t k = 0; k < K; ++k) {
    const v16f b0 = vload(B + k * bks), b1 = vload(B + k * bks + 16);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      const v16f a = splat(A[r * ars + k * aks]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    vstore(C + r * ldc, acc[r][0]);
    vstore(C + r * ldc + 16, acc[r][1]);
  }
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Everything the per-thread work functions read. Float32 operands, zero-padded:
//   the weight (Vp, Dp) and the d W accumulator (Vp, Dp), rows addressed through wrow / dwrow:
//   rows below Vfull in Wf / dWf, the rest in the small Wtail / dWtail. A float32 weight whose
//   rows are already Dp apart is read in place and its gradient accumulated straight into
//   grad_weight (Vfull = V rounded down to kUnit; only the last partial unit is copied), which
//   saves two (V, D) float32 buffers at the peak of a training step; otherwise Wf and dWf are
//   full padded copies and Vfull = Vp. Hp the hidden rows packed as panels of H^T, panel q,
//   depth k, column c at Hp[(q * D + k) * kNR + c] = hidden[q * kNR + c][k]; Hf (Np, Dp) the
//   hidden rows; LT (Vp, R) the logits (then G) of the current block.
// The bf16 path keeps bf16 bits instead, in layouts where the two depths of a pair are adjacent:
//   Wb (Vp, Dp) the weight; Hp2 panel q, depth pair kp, column c, parity e at
//   Hp2[((q * Dp/2 + kp) * kNR + c) * 2 + e] = hidden[q * kNR + c][2 kp + e]; Hr2 the hidden
//   rows in row pairs, Hr2[((r/2) * Dp + d) * 2 + r%2] = hidden[r][d]; Wv2 the weight in
//   vocabulary pairs, Wv2[((v/2) * Dp + d) * 2 + v%2] = W[v][d]; G in bf16 twice, Gb1 (Vp, R)
//   as LT and Gb2[((v/2) * R + r) * 2 + v%2] = G[v][r].
struct Work {
  int64_t N, D, V, Dp, Vp, R;
  float eps;
  const float* bias;
  int64_t Vfull;
  const float* Wf;
  const float* Wtail;
  const float* Hp;
  const float* Hf;
  float* LT;
  float* dWf;
  float* dWtail;
  const float* lse_blk;    // (R,) lse of the block's rows
  const float* scale_blk;  // (R,) the rows' gradient scales, 0 for ignored and padding rows
  const int32_t* label_blk;  // (R,) the rows' labels, -1 for ignored and padding rows
  float* dHb;              // (R, Dp) float32 d hidden of the block
  const uint16_t* Wb = nullptr;
  const uint16_t* Wv2 = nullptr;
  const uint16_t* Hp2 = nullptr;
  const uint16_t* Hr2 = nullptr;
  uint16_t* Gb1 = nullptr;
  uint16_t* Gb2 = nullptr;
};

// Row v of the padded float32 weight and of the d W accumulator (see Work).
VLMFAST_INLINE const float* wrow(const Work& w, int64_t v) {
  return v < w.Vfull ? w.Wf + v * w.Dp : w.Wtail + (v - w.Vfull) * w.Dp;
}
VLMFAST_INLINE float* dwrow(const Work& w, int64_t v) {
  return v < w.Vfull ? w.dWf + v * w.Dp : w.dWtail + (v - w.Vfull) * w.Dp;
}

// Bias and the online log-sum-exp of the kMR logit lines from vt (rows a multiple of 16).
VLMFAST_INLINE void tile_stats(const Work& w, int64_t vt, int64_t rows, float* m, float* s, float* sz) {
  const int64_t R = w.R;
  const int64_t live = std::min<int64_t>(kMR, w.V - vt);  // padding vocabulary rows stay out
  if (live <= 0) return;
  if (w.bias != nullptr)
    for (int64_t i = 0; i < live; ++i) {
      const v16f b = splat(w.bias[vt + i]);
      float* line = w.LT + (vt + i) * R;
      for (int64_t r = 0; r < rows; r += 16) vstore(line + r, vload(line + r) + b);
    }
  // s <- s e^(m - m') + sum_v e^(z_v - m') with m' the new max.
  for (int64_t r = 0; r < rows; r += 16) {
    const v16f m_old = vload(m + r);
    v16f m_new = m_old;
    for (int64_t i = 0; i < live; ++i) m_new = vmax(m_new, vload(w.LT + (vt + i) * R + r));
    v16f sum = vload(s + r) * vexp(m_old - m_new), total = vload(sz + r);
    for (int64_t i = 0; i < live; ++i) {
      const v16f z = vload(w.LT + (vt + i) * R + r);
      sum += vexp(z - m_new);
      total += z;
    }
    vstore(m + r, m_new);
    vstore(s + r, sum);
    vstore(sz + r, total);
  }
}

// The kMR logit lines from vt -> G in place (0 on padding lines); grad_bias += their row sums.
VLMFAST_INLINE void tile_grads(const Work& w, int64_t vt, int64_t rows, float* grad_bias) {
  const int64_t R = w.R;
  const v16f uniform = splat(w.eps / static_cast<float>(w.V));
  const v16f target = splat(1.0f - w.eps);
  for (int64_t i = 0; i < kMR; ++i) {
    const int64_t v = vt + i;
    float* line = w.LT + v * R;
    if (v >= w.V) {
      for (int64_t r = 0; r < rows; ++r) line[r] = 0.0f;
      continue;
    }
    const v16i vv = v16i{} + static_cast<int32_t>(v);
    v16f line_sum = splat(0.0f);
    for (int64_t r = 0; r < rows; r += 16) {
      const v16f p = vexp(vload(line + r) - vload(w.lse_blk + r));
      const v16f onehot = vload(w.label_blk + r) == vv ? target : splat(0.0f);
      const v16f g = vload(w.scale_blk + r) * (p - onehot - uniform);
      vstore(line + r, g);
      line_sum += g;
    }
    if (grad_bias != nullptr) grad_bias[v] += hsum(line_sum);
  }
}

// Logits of block rows [panel0 * 32, panel0 * 32 + rows) (rows a multiple of kUnit) against
// vocabulary rows [v0, v1) into LT, and their running (max m, sum of exp s, sum sz) per row.
VLMFAST_MULTIVERSION void logits_range(const Work& w, int64_t v0, int64_t v1, int64_t panel0,
                                       int64_t rows, float* m, float* s, float* sz) {
  const int64_t R = w.R;
  for (int64_t vt = v0; vt < v1; vt += kMR) {
    // logits^T[v][r] = sum_k W[v][k] H[r][k]: one weight tile (kMR rows, in L1) against every
    // panel of the block (in L2), so the weight streams from memory once per block.
    for (int64_t q = 0; q < rows / kNR; ++q)
      micro_kernel(wrow(w, vt), w.Dp, 1, w.Hp + (panel0 + q) * w.D * kNR, kNR, w.D,
                   w.LT + vt * R + q * kNR, R, false);
    tile_stats(w, vt, rows, m, s, sz);
  }
}

// For vocabulary rows [v0, v1): LT -> G in place, grad_bias += row sums of G, and
// dWf[v] += sum_r G[v][r] Hf[block row r] (block rows from r0, `rows` of them).
VLMFAST_MULTIVERSION void grads_range(const Work& w, int64_t v0, int64_t v1, int64_t r0,
                                      int64_t rows, float* grad_bias) {
  const int64_t R = w.R;
  for (int64_t vt = v0; vt < v1; vt += kMR) {
    tile_grads(w, vt, rows, grad_bias);
    // d W[v][d] += sum_r G[v][r] H[r][d]: the G tile (kMR lines) against the block's hidden rows.
    for (int64_t p = 0; p < w.Dp / kNR; ++p)
      micro_kernel(w.LT + vt * R, R, 1, w.Hf + r0 * w.Dp + p * kNR, w.Dp, rows,
                   dwrow(w, vt) + p * kNR, w.Dp, true);
  }
}

// d hidden[r][d] = sum_v G[v][r] W[v][d] for the 32 feature columns of panel p and block rows
// [0, rows), into dHb. The vocabulary goes in kKC-deep sweeps so the weight slab (kKC x 32) stays
// in L1 while every row tile passes over it.
VLMFAST_MULTIVERSION void hidden_grad_panel(const Work& w, int64_t p, int64_t rows) {
  const int64_t R = w.R;
  for (int64_t vc = 0, depth = 0; vc < w.Vp; vc += depth) {
    depth = std::min(kKC, w.Vp - vc);
    if (vc < w.Vfull) depth = std::min(depth, w.Vfull - vc);  // a sweep never straddles Wf and Wtail
    for (int64_t rt = 0; rt < rows; rt += kMR)
      micro_kernel(w.LT + vc * R + rt, 1, R, wrow(w, vc) + p * kNR, w.Dp, depth,
                   w.dHb + rt * w.Dp + p * kNR, w.Dp, vc > 0);
  }
}

#ifdef LCE_BF16_DOTS
// C[r][c] (+)= sum_{kp < KP} sum_{e < 2} A[r * ars + kp * akps + e] * B[kp * bkps + 2 c + e] for
// r < kMR, c < kNR, on bf16 bits: the pair (A0, A1) is broadcast and vdpbf16ps adds A0 B0 + A1 B1
// to each float32 lane.
LCE_BF16_TARGET VLMFAST_INLINE void micro_kernel_bf16(const uint16_t* A, int64_t ars, int64_t akps,
                                                  const uint16_t* B, int64_t bkps, int64_t KP,
                                                  float* C, int64_t ldc, bool accumulate) {
  __m512 acc[kMR][2];
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = accumulate ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < KP; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + kp * bkps);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + kp * bkps + 32);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, A + r * ars + kp * akps, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_ps(C + r * ldc, acc[r][0]);
    _mm512_storeu_ps(C + r * ldc + 16, acc[r][1]);
  }
}

LCE_BF16_TARGET void logits_range_bf16(const Work& w, int64_t v0, int64_t v1, int64_t panel0,
                                       int64_t rows, float* m, float* s, float* sz) {
  const int64_t R = w.R, half = w.Dp / 2;
  for (int64_t vt = v0; vt < v1; vt += kMR) {
    for (int64_t q = 0; q < rows / kNR; ++q)
      micro_kernel_bf16(w.Wb + vt * w.Dp, w.Dp, 2, w.Hp2 + (panel0 + q) * half * 2 * kNR, 2 * kNR,
                        half, w.LT + vt * R + q * kNR, R, false);
    tile_stats(w, vt, rows, m, s, sz);
  }
}

LCE_BF16_TARGET void grads_range_bf16(const Work& w, int64_t v0, int64_t v1, int64_t r0,
                                      int64_t rows, float* grad_bias) {
  const int64_t R = w.R;
  for (int64_t vt = v0; vt < v1; vt += kMR) {
    tile_grads(w, vt, rows, grad_bias);
    // G in bf16 (rounded to nearest even), in both layouts the gradient GEMMs read.
    for (int64_t i = 0; i < kMR; ++i) {
      const int64_t v = vt + i;
      const float* line = w.LT + v * R;
      for (int64_t r = 0; r < rows; ++r) {
        const uint16_t bits = from_float<BFloat16>(line[r]).bits;
        w.Gb1[v * R + r] = bits;
        w.Gb2[((v / 2) * R + r) * 2 + (v & 1)] = bits;
      }
    }
    // d W[v][d] += sum_r G[v][r] H[r][d], over row pairs
    for (int64_t p = 0; p < w.Dp / kNR; ++p)
      micro_kernel_bf16(w.Gb1 + vt * R, R, 2, w.Hr2 + (r0 / 2) * w.Dp * 2 + p * 2 * kNR, 2 * w.Dp,
                        rows / 2, w.dWf + vt * w.Dp + p * kNR, w.Dp, true);
  }
}

LCE_BF16_TARGET void hidden_grad_panel_bf16(const Work& w, int64_t p, int64_t rows) {
  const int64_t R = w.R;
  for (int64_t vc = 0; vc < w.Vp; vc += kKC) {
    const int64_t depth = std::min(kKC, w.Vp - vc);
    for (int64_t rt = 0; rt < rows; rt += kMR)
      micro_kernel_bf16(w.Gb2 + ((vc / 2) * R + rt) * 2, 2, 2 * R,
                        w.Wv2 + ((vc / 2) * w.Dp + p * kNR) * 2, 2 * w.Dp, depth / 2,
                        w.dHb + rt * w.Dp + p * kNR, w.Dp, vc > 0);
  }
}

bool cpu_has_bf16_dots() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}
#else
bool cpu_has_bf16_dots() { return false; }
#endif

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

template <typename T>
void run(const LinearCrossEntropyShape& s, const T* hidden, const T* weight, const float* bias,
         const int64_t* labels, const LinearCrossEntropyOptions& o, float* lse, float* loss_rows,
         const float* row_scale, T* grad_hidden, T* grad_weight, float* grad_bias, int threads) {
  const bool grads = row_scale != nullptr;
  const int64_t N = s.N, D = s.D, V = s.V;
  const int64_t Dp = round_up(D, kNR), Vp = round_up(V, kUnit);
  const int64_t blocks_wanted = o.block_rows > 0 ? round_up(o.block_rows, kUnit) / kUnit
                                                 : kLogitBudget / (Vp * kUnit);
  const int64_t R = kUnit * std::clamp<int64_t>(blocks_wanted, 1, round_up(N, kUnit) / kUnit);
  const int64_t Np = round_up(N, R);
  // Threads meet at four barriers per block; on a small problem (or a busy machine) waiting for a
  // descheduled thread costs more than the work, so small problems run on one thread, and no
  // thread is started without a share of the vocabulary.
  const bool small = N * Dp * Vp < (int64_t(1) << 25);
  const int nthreads = small ? 1 : static_cast<int>(std::min<int64_t>(resolve_threads(threads), Vp / kUnit));

  // bf16 operands for the GEMMs where the CPU multiplies them natively; float32 copies otherwise.
  bool bf16_dots = false;
  if constexpr (std::is_same_v<T, BFloat16>) bf16_dots = cpu_has_bf16_dots();
  const int64_t fp32_ops = bf16_dots ? 0 : 1;
  // float32 weight rows Dp apart: read in place, d W accumulated into grad_weight (see Work)
  const bool in_place = std::is_same_v<T, float> && D == Dp && s.weight_stride == D;
  const int64_t Vfull = in_place ? V / kUnit * kUnit : Vp;
  std::unique_ptr<float[]> Wf(new float[in_place ? 0 : fp32_ops * Vp * Dp]);
  std::unique_ptr<float[]> Wtail(new float[(Vp - Vfull) * Dp]);
  std::unique_ptr<float[]> LT(new float[Vp * R]);
  std::vector<float> Hp(fp32_ops * Np * D, 0.0f);
  std::vector<float> Hf(grads ? fp32_ops * Np * Dp : 0, 0.0f);
  const int64_t bf16_ops = bf16_dots ? 1 : 0;
  std::unique_ptr<uint16_t[]> Wb(new uint16_t[bf16_ops * Vp * Dp]);
  std::unique_ptr<uint16_t[]> Wv2(new uint16_t[(grads ? bf16_ops : 0) * Vp * Dp]);
  std::vector<uint16_t> Hp2(bf16_ops * Np * Dp, 0);
  std::vector<uint16_t> Hr2(grads ? bf16_ops * Np * Dp : 0, 0);
  std::unique_ptr<uint16_t[]> Gb1(new uint16_t[(grads ? bf16_ops : 0) * Vp * R]);
  std::unique_ptr<uint16_t[]> Gb2(new uint16_t[(grads ? bf16_ops : 0) * Vp * R]);
  std::unique_ptr<float[]> dWf(grads && !in_place ? new float[Vp * Dp] : nullptr);
  std::unique_ptr<float[]> dWtail(grads ? new float[(Vp - Vfull) * Dp] : nullptr);
  const float* Wmain = Wf.get();
  float* dWmain = dWf.get();
  if constexpr (std::is_same_v<T, float>) {
    if (in_place) {
      Wmain = weight;
      dWmain = grad_weight;
    }
  }
  std::vector<float> dHb(grads ? R * Dp : 0);
  std::vector<float> run_max(nthreads * R), run_sum(nthreads * R), run_total(nthreads * R);
  std::vector<float> target_logit(R), lse_blk(R), scale_blk(R);
  std::vector<int32_t> label_blk(R);
  const Work w{N, D, V, Dp, Vp, R, o.label_smoothing, bias, Vfull, Wmain, Wtail.get(), Hp.data(),
               Hf.data(), LT.get(), dWmain, dWtail.get(), lse_blk.data(), scale_blk.data(), label_blk.data(),
               dHb.data(), Wb.get(), Wv2.get(), Hp2.data(), Hr2.data(), Gb1.get(), Gb2.get()};
  auto valid_label = [&](int64_t y) { return y != o.ignore_index && y >= 0 && y < V; };
  const float eps = o.label_smoothing;

#pragma omp parallel num_threads(nthreads)
  {
    const int64_t nt = thread_count(), t = thread_index();
    // This thread's vocabulary rows for the whole call, in whole kUnit shares.
    const int64_t units = Vp / kUnit;
    const int64_t v0 = units * t / nt * kUnit, v1 = units * (t + 1) / nt * kUnit;
    float* m = run_max.data() + t * R;
    float* sm = run_sum.data() + t * R;
    float* sz = run_total.data() + t * R;

    if (bf16_dots) {
      // T is BFloat16 here: its bits are copied as they are.
      auto bits = [](const T& x) -> uint16_t {
        uint16_t b;
        std::memcpy(&b, &x, sizeof b);
        return b;
      };
#pragma omp for schedule(static) nowait
      for (int64_t v = 0; v < Vp; ++v) {
        const T* src = weight + v * s.weight_stride;
        for (int64_t k = 0; k < Dp; ++k) {
          const uint16_t b = (v < V && k < D) ? bits(src[k]) : 0;
          Wb[v * Dp + k] = b;
          if (grads) Wv2[((v / 2) * Dp + k) * 2 + (v & 1)] = b;
        }
      }
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < N; ++i) {
        const T* src = hidden + i * s.hidden_stride;
        const int64_t q = i / kNR, c = i % kNR;
        for (int64_t k = 0; k < D; ++k) {
          Hp2[((q * (Dp / 2) + k / 2) * kNR + c) * 2 + (k & 1)] = bits(src[k]);
          if (grads) Hr2[((i / 2) * Dp + k) * 2 + (i & 1)] = bits(src[k]);
        }
      }
    } else {
#pragma omp for schedule(static) nowait
      for (int64_t v = in_place ? Vfull : 0; v < Vp; ++v) {
        float* dst = const_cast<float*>(wrow(w, v));
        const T* src = weight + v * s.weight_stride;
        for (int64_t k = 0; k < Dp; ++k) dst[k] = (v < V && k < D) ? to_float(src[k]) : 0.0f;
      }
#pragma omp for schedule(static) nowait
      for (int64_t q = 0; q < N / kNR + 1; ++q)
        for (int64_t c = 0; c < kNR && q * kNR + c < N; ++c) {
          const T* src = hidden + (q * kNR + c) * s.hidden_stride;
          for (int64_t k = 0; k < D; ++k) Hp[(q * D + k) * kNR + c] = to_float(src[k]);
        }
      if (grads) {
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < N; ++i)
          for (int64_t k = 0; k < D; ++k) Hf[i * Dp + k] = to_float(hidden[i * s.hidden_stride + k]);
      }
    }
    if (grads) {
      for (int64_t v = v0; v < v1; ++v) {
        std::fill(dwrow(w, v), dwrow(w, v) + Dp, 0.0f);
        if (grad_bias != nullptr && v < V) grad_bias[v] = 0.0f;
      }
    }
#pragma omp barrier

    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0), live_rows = round_up(rows, kUnit);
      std::fill(m, m + live_rows, -std::numeric_limits<float>::infinity());
      std::fill(sm, sm + live_rows, 0.0f);
      std::fill(sz, sz + live_rows, 0.0f);
      if (v1 > v0) {
#ifdef LCE_BF16_DOTS
        if (bf16_dots) logits_range_bf16(w, v0, v1, r0 / kNR, live_rows, m, sm, sz);
        else
#endif
          logits_range(w, v0, v1, r0 / kNR, live_rows, m, sm, sz);
      }
      for (int64_t r = 0; r < rows; ++r) {  // the target logits that fall in this thread's rows
        const int64_t y = labels[r0 + r];
        if (valid_label(y) && y >= v0 && y < v1) target_logit[r] = LT[y * R + r];
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t r = 0; r < live_rows; ++r) {
        float M = -std::numeric_limits<float>::infinity(), S = 0.0f, Z = 0.0f;
        for (int64_t u = 0; u < nt; ++u) M = std::max(M, run_max[u * R + r]);
        for (int64_t u = 0; u < nt; ++u) {
          const float mu = run_max[u * R + r];
          if (mu > -std::numeric_limits<float>::infinity()) S += run_sum[u * R + r] * std::exp(mu - M);
          Z += run_total[u * R + r];
        }
        const float row_lse = M + std::log(S);
        const int64_t row = r0 + r;
        const bool valid = row < N && valid_label(labels[row]);
        if (row < N) {
          lse[row] = row_lse;
          loss_rows[row] = valid ? row_lse - (1.0f - eps) * target_logit[r] - eps / V * Z : 0.0f;
        }
        lse_blk[r] = row_lse;
        scale_blk[r] = grads && valid ? row_scale[row] : 0.0f;
        label_blk[r] = valid ? static_cast<int32_t>(labels[row]) : -1;
      }
      if (!grads) continue;  // the loop's barrier above protects LT and the partials
      if (v1 > v0) {
#ifdef LCE_BF16_DOTS
        if (bf16_dots) grads_range_bf16(w, v0, v1, r0, live_rows, grad_bias);
        else
#endif
          grads_range(w, v0, v1, r0, live_rows, grad_bias);
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t p = 0; p < Dp / kNR; ++p) {
#ifdef LCE_BF16_DOTS
        if (bf16_dots) hidden_grad_panel_bf16(w, p, live_rows);
        else
#endif
          hidden_grad_panel(w, p, live_rows);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = p * kNR; k < std::min(D, (p + 1) * kNR); ++k)
            grad_hidden[(r0 + r) * D + k] = from_float<T>(dHb[r * Dp + k]);
      }
    }
    if (grads) {
#pragma omp for schedule(static)
      for (int64_t v = in_place ? Vfull : 0; v < V; ++v)
        for (int64_t k = 0; k < D; ++k) grad_weight[v * D + k] = from_float<T>(dwrow(w, v)[k]);
    }
  }
}

}  // namespace

void linear_cross_entropy(const LinearCrossEntropyShape& shape, const void* hidden,
                          const void* weight, const float* bias, const int64_t* labels,
                          const LinearCrossEntropyOptions& options, float* lse, float* loss_rows,
                          const float* row_scale, void* grad_hidden, void* grad_weight,
                          float* grad_bias, int dtype, int threads) {
  switch (dtype_from_tag(dtype)) {
    case DType::Float32:
      return run(shape, static_cast<const float*>(hidden), static_cast<const float*>(weight), bias,
                 labels, options, lse, loss_rows, row_scale, static_cast<float*>(grad_hidden),
                 static_cast<float*>(grad_weight), grad_bias, threads);
    case DType::Float16:
      return run(shape, static_cast<const Half*>(hidden), static_cast<const Half*>(weight), bias,
                 labels, options, lse, loss_rows, row_scale, static_cast<Half*>(grad_hidden),
                 static_cast<Half*>(grad_weight), grad_bias, threads);
    case DType::BFloat16:
      return run(shape, static_cast<const BFloat16*>(hidden), static_cast<const BFloat16*>(weight),
                 bias, labels, options, lse, loss_rows, row_scale,
                 static_cast<BFloat16*>(grad_hidden), static_cast<BFloat16*>(grad_weight),
                 grad_bias, threads);
  }
}

}  // namespace vlmfast::cpu
