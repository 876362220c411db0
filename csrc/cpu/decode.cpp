#include "cpu/decode.h"

#include "common/dtype.h"
#include "common/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLMFAST_DECODE_X86 1
// 512-bit vectors cross only inlined helpers here; the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 headers build shuffles on _mm512_undefined_ps(), which it then flags.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vlmfast::cpu {
namespace {

// ------------------------------------------------------------------ matrix-vector products
// out[b * N + n] = sum_k w[n * K + k] x[b * K + k] for output rows n in [n0, n1). Rows of w go
// four at a time (adjacent rows: one contiguous stream for the prefetcher); each group of four
// is read from memory once and reused from L1 for every row b of x.

#ifdef VLMFAST_DECODE_X86
#define VLMFAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 32 bf16 values from p + k; past `full` (the K tail) only the lanes of `tail`, the rest zero.
VLMFAST_BF16_TARGET __attribute__((always_inline)) inline __m512bh load_bf16(const uint16_t* p, int64_t k,
                                                                           int64_t full, __mmask32 tail) {
  return (__m512bh)(k < full ? _mm512_loadu_si512(p + k) : _mm512_maskz_loadu_epi16(tail, p + k));
}

__attribute__((target("avx512f"))) __attribute__((always_inline)) inline __m512 load_f32(
    const float* p, int64_t k, int64_t full, __mmask16 tail) {
  return k < full ? _mm512_loadu_ps(p + k) : _mm512_maskz_loadu_ps(tail, p + k);
}

// The 16 lanes' sum (halves folded: 8 adds' worth of latency, no store).
__attribute__((target("avx512f"))) __attribute__((always_inline)) inline float hsum512(__m512 v) {
  __m512 t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
  __m128 r = _mm512_castps512_ps128(t);
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// Software prefetch of the next group of rows while this one is read. A group's rows are
// adjacent, so its bytes are one run; four lines per step of the dot products (the lines the step
// reads) cover the run by the time the group is done, so the next group's four interleaved
// streams need no ramp-up of the hardware prefetcher. With it, and whole steps on plain loads
// (the tail's masked load out of the loop), one core of an AMD EPYC (Zen 5) streams the bf16 head
// (49280 x 576) at 24.6-25.6 GB/s instead of 20-21 (a plain read of the same bytes: ~33), loaded
// machine, thread CPU time.
struct NextGroup {
  const char* p;
  int64_t left;  // lines still to prefetch
  __attribute__((always_inline)) inline void step() {
    for (int i = 0; i < 4 && left > 0; ++i, --left, p += 64) _mm_prefetch(p, _MM_HINT_T0);
  }
};

inline NextGroup next_group(const void* w, int64_t row_bytes, int64_t n, int64_t n1) {
  const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(4, n1 - (n + 4)));
  return {static_cast<const char*>(w) + (n + 4) * row_bytes, rows * row_bytes / 64};
}

VLMFAST_BF16_TARGET void gemv_bf16_avx512(
    const uint16_t* w, const uint16_t* x, float* out, int64_t B, int64_t N, int64_t K, int64_t n0,
    int64_t n1) {
  const int64_t full = K / 32 * 32;
  // vdpbf16ps multiplies 32 bf16 pairs into 16 float lanes; the K tail is zero-filled by a mask
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - full)) - 1);
  auto load = [=](const uint16_t* p, int64_t k) VLMFAST_BF16_TARGET { return load_bf16(p, k, full, tail); };
  const int64_t end = K > full ? full + 32 : full;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const uint16_t* w0 = w + n * K;
    NextGroup next = next_group(w, K * 2, n, n1);
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {  // two rows of x per load of the weights: half the L1 traffic
      const uint16_t* xa = x + b * K;
      const uint16_t* xb = xa + K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
      for (int64_t k = 0; k < end; k += 32) {
        next.step();
        const __m512bh xv = load(xa, k), yv = load(xb, k);
        const __m512bh v0 = load(w0, k), v1 = load(w0 + K, k), v2 = load(w0 + 2 * K, k),
                       v3 = load(w0 + 3 * K, k);
        a0 = _mm512_dpbf16_ps(a0, v0, xv);
        a1 = _mm512_dpbf16_ps(a1, v1, xv);
        a2 = _mm512_dpbf16_ps(a2, v2, xv);
        a3 = _mm512_dpbf16_ps(a3, v3, xv);
        c0 = _mm512_dpbf16_ps(c0, v0, yv);
        c1 = _mm512_dpbf16_ps(c1, v1, yv);
        c2 = _mm512_dpbf16_ps(c2, v2, yv);
        c3 = _mm512_dpbf16_ps(c3, v3, yv);
      }
      float* o = out + b * N + n;
      o[0] = hsum512(a0);
      o[1] = hsum512(a1);
      o[2] = hsum512(a2);
      o[3] = hsum512(a3);
      o += N;
      o[0] = hsum512(c0);
      o[1] = hsum512(c1);
      o[2] = hsum512(c2);
      o[3] = hsum512(c3);
    }
    for (; b < B; ++b) {
      const uint16_t* xb = x + b * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < full; k += 32) {  // whole steps: plain loads, rows addressed from one base
        next.step();
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + K + k), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w0 + 2 * K + k), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w0 + 3 * K + k), xv);
      }
      if (k < end) {
        const __m512bh xv = load(xb, k);
        a0 = _mm512_dpbf16_ps(a0, load(w0, k), xv);
        a1 = _mm512_dpbf16_ps(a1, load(w0 + K, k), xv);
        a2 = _mm512_dpbf16_ps(a2, load(w0 + 2 * K, k), xv);
        a3 = _mm512_dpbf16_ps(a3, load(w0 + 3 * K, k), xv);
      }
      float* o = out + b * N + n;
      o[0] = hsum512(a0);
      o[1] = hsum512(a1);
      o[2] = hsum512(a2);
      o[3] = hsum512(a3);
    }
  }
  for (; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < end; k += 32) a = _mm512_dpbf16_ps(a, load(wn, k), load(x + b * K, k));
      out[b * N + n] = hsum512(a);
    }
  }
}

__attribute__((target("avx512f"))) void gemv_f32_avx512(const float* w, const float* x, float* out,
                                                        int64_t B, int64_t N, int64_t K, int64_t n0,
                                                        int64_t n1) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1);
  auto load = [=](const float* p, int64_t k) __attribute__((target("avx512f"))) {
    return load_f32(p, k, full, tail);
  };
  const int64_t end = K > full ? full + 16 : full;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    NextGroup next = next_group(w, K * 4, n, n1);
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < full; k += 16) {
        next.step();
        const __m512 xv = _mm512_loadu_ps(xb + k);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + K + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 2 * K + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 3 * K + k), xv, a3);
      }
      if (k < end) {
        const __m512 xv = load(xb, k);
        a0 = _mm512_fmadd_ps(load(w0, k), xv, a0);
        a1 = _mm512_fmadd_ps(load(w0 + K, k), xv, a1);
        a2 = _mm512_fmadd_ps(load(w0 + 2 * K, k), xv, a2);
        a3 = _mm512_fmadd_ps(load(w0 + 3 * K, k), xv, a3);
      }
      float* o = out + b * N + n;
      o[0] = hsum512(a0);
      o[1] = hsum512(a1);
      o[2] = hsum512(a2);
      o[3] = hsum512(a3);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < end; k += 16) a = _mm512_fmadd_ps(load(w + n * K, k), load(x + b * K, k), a);
      out[b * N + n] = hsum512(a);
    }
  }
}
#endif

// Any CPU: 16 float partial sums per dot product (lane-wise, so the compiler may vectorise it
// without reordering a sum).
template <typename T>
void gemv_portable(const T* w, const T* x, float* out, int64_t B, int64_t N, int64_t K, int64_t n0,
                   int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      float lanes[16] = {};
      for (int64_t k = 0; k < K; ++k) lanes[k % 16] += to_float(w[n * K + k]) * to_float(x[b * K + k]);
      float sum = 0.0f;
      for (float lane : lanes) sum += lane;
      out[b * N + n] = sum;
    }
  }
}

struct CpuSupport {
  bool avx512f = false, avx512_bf16 = false;
};

const CpuSupport& cpu_support() {
  static const CpuSupport support = [] {
    CpuSupport s;
#ifdef VLMFAST_DECODE_X86
    __builtin_cpu_init();
    s.avx512f = __builtin_cpu_supports("avx512f");
    s.avx512_bf16 = s.avx512f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
#endif
    return s;
  }();
  return support;
}

template <typename T> inline float round_to(float v) { return to_float(from_float<T>(v)); }
template <> inline float round_to<float>(float v) { return v; }

// Rows [n0, n1) of out (B, N) = round_T(x @ w^T + bias): the eager model's linear rounds its
// float32 accumulation (bias included) to its dtype once.
template <typename T>
void gemv_rows(const T* w, const T* bias, const T* x, float* out, int64_t B, int64_t N, int64_t K,
               int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  bool done = false;
#ifdef VLMFAST_DECODE_X86
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (cpu_support().avx512_bf16) {
      gemv_bf16_avx512(reinterpret_cast<const uint16_t*>(w), reinterpret_cast<const uint16_t*>(x),
                       out, B, N, K, n0, n1);
      done = true;
    }
  } else {
    if (cpu_support().avx512f) {
      gemv_f32_avx512(w, x, out, B, N, K, n0, n1);
      done = true;
    }
  }
#endif
  if (!done) gemv_portable(w, x, out, B, N, K, n0, n1);
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * N;
    for (int64_t n = n0; n < n1; ++n) o[n] = round_to<T>(bias ? o[n] + to_float(bias[n]) : o[n]);
  }
}

// This thread's share [n0, n1) of N output rows, in multiples of 4 (the kernels' row group).
inline void share(int64_t N, int tid, int team, int64_t& n0, int64_t& n1) {
  const int64_t groups = (N + 3) / 4;
  const int64_t per = (groups + team - 1) / team;
  n0 = std::min(N, tid * per * 4);
  n1 = std::min(N, n0 + per * 4);
}

// ------------------------------------------------------------------ the small per-row stages

// out (D,) = round_T(weight * round_T(x * rsqrt(mean(x^2) + eps))): Llama's RMSNorm, in the
// order the eager model rounds (normalised in float32, rounded, then scaled).
template <typename T>
void rms_norm_row(const float* x, const T* weight, T* out, int64_t D, float eps) {
  float sum = 0.0f;
  for (int64_t i = 0; i < D; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = from_float<T>(to_float(weight[i]) * round_to<T>(x[i] * inv));
}

// Rotates x (E,) in place by one token's angles (rotate-half pairs (i, i + E/2)), rounding to T.
template <typename T>
__attribute__((always_inline)) inline void rotate(float* x, const float* cos, const float* sin, int64_t E) {
  const int64_t half = E / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], c = x[i + half];
    x[i] = round_to<T>(a * cos[i] - c * sin[i]);
    x[i + half] = round_to<T>(c * cos[i] + a * sin[i]);
  }
}

// One (row b, query head h) task: rotates h's query in qkv_row (float, values in T's precision)
// and attends the cache slots [0, slot] of its key/value head g: softmax(scale q.k_j, masked) @
// v_j, rounded to T into out_row (H E). The new token's key (rotated into k_new, E floats of this
// task's scratch) and value are used from registers, not read back from the cache, and only the
// group's first head writes them to slot `slot`: tasks never wait for one another, and split
// evenly between threads at any batch size. scores: slot + 1 floats of scratch; acc: E floats.
template <typename T>
__attribute__((always_inline)) inline void attend_head(const DecodeShape& s, float* qkv_row,
                                                       const float* cos, const float* sin,
                                                       T* k_cache, T* v_cache, const bool* key_mask,
                                                       int64_t b, int64_t h, float* scores,
                                                       float* acc, float* k_new, T* out_row) {
  const int64_t E = s.E, group = s.H / s.Hkv, g = h / group;
  const float* k_src = qkv_row + (s.H + g) * E;
  const float* v_new = qkv_row + (s.H + s.Hkv + g) * E;
  for (int64_t e = 0; e < E; ++e) k_new[e] = k_src[e];
  rotate<T>(k_new, cos, sin, E);
  T* keys = k_cache + (b * s.Hkv + g) * s.max_len * E;
  T* values = v_cache + (b * s.Hkv + g) * s.max_len * E;
  if (h % group == 0) {
    for (int64_t e = 0; e < E; ++e) {
      keys[s.slot * E + e] = from_float<T>(k_new[e]);
      values[s.slot * E + e] = from_float<T>(v_new[e]);
    }
  }
  const bool* mask = key_mask ? key_mask + b * s.max_len : nullptr;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  float* q = qkv_row + h * E;
  rotate<T>(q, cos, sin, E);
  // scores of the cached slots [0, slot), then of the new token (always real)
  float top = minus_inf;
  for (int64_t j = 0; j < s.slot; ++j) {
    if (mask && !mask[j]) {
      scores[j] = minus_inf;
      continue;
    }
    const T* k = keys + j * E;
    float lanes[16] = {};
    for (int64_t e = 0; e < E; ++e) lanes[e % 16] += q[e] * to_float(k[e]);
    float dot = 0.0f;
    for (float lane : lanes) dot += lane;
    scores[j] = dot * s.scale;
    top = std::max(top, scores[j]);
  }
  {
    float lanes[16] = {};
    for (int64_t e = 0; e < E; ++e) lanes[e % 16] += q[e] * k_new[e];
    float dot = 0.0f;
    for (float lane : lanes) dot += lane;
    scores[s.slot] = dot * s.scale;
    top = std::max(top, scores[s.slot]);
  }
  float total = 0.0f;
  for (int64_t e = 0; e < E; ++e) acc[e] = 0.0f;
  for (int64_t j = 0; j < s.slot; ++j) {
    if (scores[j] == minus_inf) continue;
    const float p = std::exp(scores[j] - top);
    total += p;
    const T* v = values + j * E;
    for (int64_t e = 0; e < E; ++e) acc[e] += p * to_float(v[e]);
  }
  const float p = std::exp(scores[s.slot] - top);
  total += p;
  for (int64_t e = 0; e < E; ++e) acc[e] += p * v_new[e];
  const float inv = 1.0f / total;  // total >= 1: the new token's term is exp(0) at the max
  for (int64_t e = 0; e < E; ++e) out_row[h * E + e] = from_float<T>(acc[e] * inv);
}

// Tasks (b, h) = begin, begin + step, ... < B * H, compiled for the widest vectors the CPU has.
#define VLMFAST_DEFINE_ATTEND(T, SUFFIX)                                                          \
  VLMFAST_MULTIVERSION void attend_##SUFFIX(const DecodeShape& s, float* qkv, const float* cos,  \
                                            const float* sin, void* k_cache, void* v_cache,      \
                                            const bool* key_mask, int64_t begin, int64_t step,   \
                                            float* scores, float* acc, float* k_new, void* out) { \
    const int64_t width = (s.H + 2 * s.Hkv) * s.E, half = s.E / 2;                                \
    for (int64_t task = begin; task < s.B * s.H; task += step) {                                  \
      const int64_t b = task / s.H, h = task % s.H;                                               \
      attend_head<T>(s, qkv + b * width, cos + b * half, sin + b * half,                          \
                     static_cast<T*>(k_cache), static_cast<T*>(v_cache), key_mask, b, h, scores,  \
                     acc, k_new, static_cast<T*>(out) + b * s.H * s.E);                           \
    }                                                                                             \
  }
VLMFAST_DEFINE_ATTEND(float, f32)
VLMFAST_DEFINE_ATTEND(BFloat16, bf16)
#undef VLMFAST_DEFINE_ATTEND

template <typename T>
void attend(const DecodeShape& s, float* qkv, const float* cos, const float* sin, void* k, void* v,
            const bool* mask, int64_t begin, int64_t step, float* scores, float* acc, float* k_new,
            T* out) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    attend_bf16(s, qkv, cos, sin, k, v, mask, begin, step, scores, acc, k_new, out);
  } else {
    attend_f32(s, qkv, cos, sin, k, v, mask, begin, step, scores, acc, k_new, out);
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// x = round_T(x + delta) and normed = rms_norm(x) for every row: each thread keeps its own copy
// of the residual stream and of its norm (a few KB), so none waits for another to compute them.
template <typename T>
void residual_and_norm(float* x, const float* delta, const T* weight, T* normed, int64_t B, int64_t D,
                       float eps) {
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x + b * D;
    if (delta != nullptr) {
      for (int64_t i = 0; i < D; ++i) xb[i] = round_to<T>(xb[i] + delta[b * D + i]);
    }
    rms_norm_row(xb, weight, normed + b * D, D, eps);
  }
}

// ------------------------------------------------------------------ the step
//
// One parallel region; five barriers per layer, each where the next stage reads what every
// thread wrote: after qkv, after attention, after o_proj, after silu(gate) * up, after down.
// Shared buffers: qkv, attended, proj, gate_up, act (each written in one stage and read in the
// next, with a barrier between). Private per thread: the residual stream and its norms.

template <typename T>
void step(const DecodeShape& s, const int64_t* tokens, const T* embed,
          const std::vector<DecodeLayer>& layers, const T* final_norm, const T* head,
          const float* cos, const float* sin, const bool* key_mask, float* logits, int threads) {
  const int64_t B = s.B, D = s.D, E = s.E, I = s.I;
  const int64_t Q = s.H * E, W = (s.H + 2 * s.Hkv) * E;
  const int team_size = resolve_threads(threads);
  std::vector<float> qkv(B * W), proj(B * D), gate_up(B * 2 * I);
  std::vector<T> attended(B * Q), act(B * I);

#pragma omp parallel num_threads(team_size)
  {
    int tid = 0, team = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    std::vector<float> x(B * D), scores(s.slot + 1), acc(E), k_new(E);
    std::vector<T> normed(B * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < D; ++i) x[b * D + i] = to_float(embed[tokens[b] * D + i]);
    int64_t n0, n1, i0, i1;
    share(I, tid, team, i0, i1);  // this thread's MLP columns: gate rows i, up rows I + i
    for (size_t l = 0; l < layers.size(); ++l) {
      const DecodeLayer& layer = layers[l];
      // the previous layer's MLP residual (proj = its down output), then this layer's norm
      residual_and_norm(x.data(), l == 0 ? nullptr : proj.data(), static_cast<const T*>(layer.input_norm),
                        normed.data(), B, D, s.eps);
      share(W, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.qkv), static_cast<const T*>(layer.qkv_bias), normed.data(),
                qkv.data(), B, W, D, n0, n1);
#pragma omp barrier
      attend<T>(s, qkv.data(), cos, sin, layer.k_cache, layer.v_cache, key_mask, tid, team,
                scores.data(), acc.data(), k_new.data(), attended.data());
#pragma omp barrier
      share(D, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.o_proj), static_cast<const T*>(layer.o_bias), attended.data(),
                proj.data(), B, D, Q, n0, n1);
#pragma omp barrier
      residual_and_norm(x.data(), proj.data(), static_cast<const T*>(layer.post_norm), normed.data(), B, D,
                        s.eps);
      const T* gu = static_cast<const T*>(layer.gate_up);
      const T* gu_bias = static_cast<const T*>(layer.gate_up_bias);
      gemv_rows(gu, gu_bias, normed.data(), gate_up.data(), B, 2 * I, D, i0, i1);
      gemv_rows(gu, gu_bias, normed.data(), gate_up.data(), B, 2 * I, D, I + i0, I + i1);
      for (int64_t b = 0; b < B; ++b) {
        const float* g = gate_up.data() + b * 2 * I;
        for (int64_t i = i0; i < i1; ++i) act[b * I + i] = from_float<T>(round_to<T>(silu(g[i])) * g[I + i]);
      }
#pragma omp barrier
      share(D, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.down), static_cast<const T*>(layer.down_bias), act.data(),
                proj.data(), B, D, I, n0, n1);
#pragma omp barrier
    }
    residual_and_norm(x.data(), proj.data(), final_norm, normed.data(), B, D, s.eps);
    share(s.V, tid, team, n0, n1);
    gemv_rows<T>(head, nullptr, normed.data(), logits, B, s.V, D, n0, n1);
  }
}

void check_shape(const DecodeShape& s, size_t layers) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("decode_step: " + what); };
  if (s.B < 1 || s.D < 1 || s.I < 1 || s.V < 1 || s.layers < 1) fail("sizes must be positive");
  if (s.H < 1 || s.Hkv < 1 || s.H % s.Hkv != 0) fail("expected H a positive multiple of Hkv");
  if (s.E < 2 || s.E % 2 != 0) fail("expected an even head dim");
  if (s.slot < 0 || s.slot >= s.max_len) fail("slot outside the cache");
  if (static_cast<int64_t>(layers) != s.layers) fail("layer table does not match the layer count");
}

}  // namespace

void decode_step(const DecodeShape& shape, const int64_t* tokens, const void* embed,
                 const std::vector<DecodeLayer>& layers, const void* final_norm, const void* head,
                 const float* cos, const float* sin, const bool* key_mask, float* logits,
                 int dtype, int threads) {
  check_shape(shape, layers.size());
  switch (dtype_from_tag(dtype)) {
    case DType::Float32:
      return step<float>(shape, tokens, static_cast<const float*>(embed), layers,
                         static_cast<const float*>(final_norm), static_cast<const float*>(head), cos,
                         sin, key_mask, logits, threads);
    case DType::BFloat16:
      return step<BFloat16>(shape, tokens, static_cast<const BFloat16*>(embed), layers,
                            static_cast<const BFloat16*>(final_norm),
                            static_cast<const BFloat16*>(head), cos, sin, key_mask, logits, threads);
    default:
      throw std::invalid_argument("decode_step: expected float32 or bfloat16 weights");
  }
}

void decode_gemv(const void* w, const void* bias, const void* x, float* out, int64_t B, int64_t N,
                 int64_t K, int dtype, int threads) {
  const DType type = dtype_from_tag(dtype);
  if (type == DType::Float16) throw std::invalid_argument("decode_gemv: expected float32 or bfloat16");
  const int team_size = resolve_threads(threads);
#pragma omp parallel num_threads(team_size)
  {
    int tid = 0, team = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    int64_t n0, n1;
    share(N, tid, team, n0, n1);
    if (type == DType::Float32) {
      gemv_rows(static_cast<const float*>(w), static_cast<const float*>(bias),
                static_cast<const float*>(x), out, B, N, K, n0, n1);
    } else {
      gemv_rows(static_cast<const BFloat16*>(w), static_cast<const BFloat16*>(bias),
                static_cast<const BFloat16*>(x), out, B, N, K, n0, n1);
    }
  }
}

bool decode_has_avx512_bf16() { return cpu_support().avx512_bf16; }

}  // namespace vlmfast::cpu
