#include "cpu/decode.h"
#include "cpu/decode_gemv.h"
#include "cpu/gemm_elements.h"
#include "cpu/swiglu_row.h"

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/vec16.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace vlmfast::cpu {
namespace {

// ------------------------------------------------------------------ matrix-vector products
// (the kernels: cpu/decode_gemv.h)

using decode_kernels::gemv_portable;
#ifdef VLMFAST_DECODE_X86
using decode_kernels::gemv_bf16_avx512;
using decode_kernels::gemv_f32_avx512;
#endif

struct CpuSupport {
  bool avx512f = false, avx512_bf16 = false;  // avx512f: F, BW and VL (decode_gemv.h's float32 kernel)
};

const CpuSupport& cpu_support() {
  static const CpuSupport support = [] {
    CpuSupport s;
#ifdef VLMFAST_DECODE_X86
    __builtin_cpu_init();
    s.avx512f = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl");
    s.avx512_bf16 = s.avx512f && __builtin_cpu_supports("avx512bf16");
#endif
    return s;
  }();
  return support;
}

template <typename T> inline float round_to(float v) { return to_float(from_float<T>(v)); }
template <> inline float round_to<float>(float v) { return v; }

// out[b * N + n] = round_T(out[b * N + n] + bias[n]) for n in [n0, n1) of every row (bias may be
// null), 16 columns at a time: the same values as dtype.h's scalar rounding, which took as long as
// a bf16 GEMV's multiply-adds at 32 rows.
template <typename T>
VLMFAST_INLINE void add_bias_and_round(float* out, const T* bias, int64_t B, int64_t N, int64_t n0, int64_t n1) {
  using gemm_elements::load_n;
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * N;
    for (int64_t n = n0; n < n1; n += 16) {
      const int64_t m = std::min<int64_t>(16, n1 - n);
      v16f v = load_n(o + n, m);
      if (bias != nullptr) v += load_n(bias + n, m);
      gemm_elements::store_n(o + n, gemm_elements::rounded<T>(v), m);
    }
  }
}

VLMFAST_MULTIVERSION void add_bias_f32(float* out, const float* bias, int64_t B, int64_t N, int64_t n0, int64_t n1) {
  add_bias_and_round(out, bias, B, N, n0, n1);
}
VLMFAST_MULTIVERSION void add_bias_and_round_bf16(float* out, const BFloat16* bias, int64_t B, int64_t N, int64_t n0,
                                                  int64_t n1) {
  add_bias_and_round(out, bias, B, N, n0, n1);
}

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
  if constexpr (std::is_same_v<T, float>) {
    if (bias != nullptr) add_bias_f32(out, bias, B, N, n0, n1);
  } else {
    add_bias_and_round_bf16(out, bias, B, N, n0, n1);
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

// n values of p (n <= 16; none when n <= 0) as float lanes, the other lanes zero: the K / V rows
// of a cache and the task's float scratch rows alike, through the GEMM epilogues' loads.
template <typename T>
VLMFAST_INLINE v16f lanes_of(const T* p, int64_t n) {
  if (n >= 16) return gemm_elements::load16(p);
  return n > 0 ? gemm_elements::load_part(p, n) : v16f{};
}

// acc[h] += q_h . k over E values for the G query heads of a group: q the heads' float rows, each
// padded with zeros to whole vectors of 16 (`padded` floats apart), k one cached key row of T,
// loaded (and widened) once for all G heads.
template <int G, typename T>
VLMFAST_INLINE void dot_rows(const float* q, int64_t padded, const T* k, int64_t E, float* out, float scale) {
  v16f acc[G] = {};
  for (int64_t e = 0; e < E; e += 16) {
    const v16f kv = lanes_of(k + e, E - e);
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h) acc[h] += vload(q + h * padded + e) * kv;
  }
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h) out[h] = hsum_tree(acc[h]) * scale;
}

// acc[h][0..4) += p[h] * v[e0 .. e0 + 64) for the G heads (lanes past E zero): one value row
// loaded (and widened) once for all of them, 4 G output vectors in registers.
template <int G, typename T>
VLMFAST_INLINE void add_values(v16f (*acc)[4], const float* p, const T* v, int64_t n) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const v16f vv = lanes_of(v + 16 * i, n - 16 * i);
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h) acc[h][i] += vv * p[h];
  }
}

// Heads [h0, h0 + G) of a group against the slots [0, slot] (the last one the new token's, from
// registers: k_new, v_new). q: the group's padded query rows; scores: the group's rows of
// `stride` floats (slot + 1 rounded up to whole vectors: AttendScratch below); out_row: the row's
// (H E) output, these heads' values rounded to T. Scores and the weighted sum of values go key by
// key, each key (and value) row read once for the G heads.
template <int G, typename T>
VLMFAST_INLINE void attend_heads(const DecodeShape& s, const float* q, int64_t padded, const T* keys,
                                 const T* values, const float* k_new, const float* v_new, const bool* mask,
                                 float* scores, int64_t stride, int64_t h0, T* out_row) {
  const int64_t E = s.E, n = s.slot + 1;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  float row[G];
  for (int64_t j = 0; j < s.slot; ++j) {
    if (mask && !mask[j]) {
      for (int h = 0; h < G; ++h) scores[h * stride + j] = minus_inf;
      continue;
    }
    dot_rows<G>(q, padded, keys + j * E, E, row, s.scale);
    for (int h = 0; h < G; ++h) scores[h * stride + j] = row[h];
  }
  dot_rows<G>(q, padded, k_new, E, row, s.scale);
  float inv[G];
  for (int h = 0; h < G; ++h) {
    float* sc = scores + h * stride;
    sc[s.slot] = row[h];
    for (int64_t j = n; j < stride; ++j) sc[j] = minus_inf;
    v16f top_lanes = splat(minus_inf);
    for (int64_t j = 0; j < stride; j += 16) top_lanes = vmax(top_lanes, vload(sc + j));
    const float top = hmax_tree(top_lanes);
    v16f total_lanes{};
    for (int64_t j = 0; j < stride; j += 16) {  // masked slots: exp(-inf) = 0
      const v16f p = vexp(vload(sc + j) - top);
      vstore(sc + j, p);
      total_lanes += p;
    }
    inv[h] = 1.0f / hsum_tree(total_lanes);  // the sum >= 1: the top slot's term is exp(0)
  }
  float p[G];
  for (int64_t e0 = 0; e0 < E; e0 += 64) {
    const int64_t cols = std::min<int64_t>(64, E - e0);
    v16f acc[G][4] = {};
    for (int64_t j = 0; j < s.slot; ++j) {
      if (mask && !mask[j]) continue;  // a padding slot's value may be anything; its weight is 0
      for (int h = 0; h < G; ++h) p[h] = scores[h * stride + j];
      add_values<G>(acc, p, values + j * E + e0, cols);
    }
    for (int h = 0; h < G; ++h) p[h] = scores[h * stride + s.slot];
    add_values<G>(acc, p, v_new + e0, cols);
    for (int h = 0; h < G; ++h) {
      float out[64];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) vstore(out + 16 * i, acc[h][i] * inv[h]);
      for (int64_t e = 0; e < cols; ++e) out_row[(h0 + h) * E + e0 + e] = from_float<T>(out[e]);
    }
  }
}

// attend_group's scratch, in floats: G score rows of `stride` (slot + 1 rounded up to whole
// vectors), G query rows of `padded` (E rounded up), then k_new (`padded`); G = H / Hkv.
struct AttendScratch {
  int64_t group, padded, stride;
  explicit AttendScratch(const DecodeShape& s)
      : group(s.H / s.Hkv), padded((s.E + 15) / 16 * 16), stride((s.slot + 1 + 15) / 16 * 16) {}
  int64_t floats() const { return group * (stride + padded) + padded; }
};

// One task: query heads [g G + h_begin, g G + h_end) of row b, G = H / Hkv the heads sharing
// key/value head g. Rotates the new key and those queries in qkv_row (float, values in T's
// precision; OPT: scales the queries by q_scale instead) and attends the slots [0, slot] for each
// of them: softmax(scale q.k_j, masked) @ v_j, rounded to T into out_row (H E). The new token's key
// (rotated into k_new) and value are used from registers, not read back from the cache; the task
// holding the group's first head writes them to slot `slot`. The task's heads go through the cache
// together, up to 4 at a time, so each cached key and value is read once for them all (a batched
// decode reads its cache from memory: 32 rows x 80 slots x 30 layers of SmolVLM2's keys and values
// are ~60 MB). Tasks never wait for one another. Vectorised over the head dim (a loop over 16
// lanes by index had compiled to scalar code), the softmax 16 slots at a time (vexp). scratch: as
// AttendScratch lays it out.
template <typename T>
VLMFAST_INLINE void attend_group(const DecodeShape& s, float* qkv_row, const float* cos, const float* sin,
                                 T* k_cache, T* v_cache, const bool* key_mask, int64_t b, int64_t g,
                                 int64_t h_begin, int64_t h_end, float* scratch, T* out_row) {
  const AttendScratch layout(s);
  const int64_t E = s.E, group = layout.group, padded = layout.padded, stride = layout.stride;
  float* scores = scratch;
  float* q = scores + group * stride;
  float* k_new = q + group * padded;
  const float* k_src = qkv_row + (s.H + g) * E;
  const float* v_new = qkv_row + (s.H + s.Hkv + g) * E;
  const bool rotary = s.kind == kDecodeLlama;
  for (int64_t e = 0; e < E; ++e) k_new[e] = k_src[e];
  if (rotary) rotate<T>(k_new, cos, sin, E);
  T* keys = k_cache + (b * s.Hkv + g) * s.max_len * E;
  T* values = v_cache + (b * s.Hkv + g) * s.max_len * E;
  if (h_begin == 0) {
    for (int64_t e = 0; e < E; ++e) {
      keys[s.slot * E + e] = from_float<T>(k_new[e]);
      values[s.slot * E + e] = from_float<T>(v_new[e]);
    }
  }
  for (int64_t h = h_begin; h < h_end; ++h) {
    float* qh = qkv_row + (g * group + h) * E;
    if (rotary) {
      rotate<T>(qh, cos, sin, E);
    } else {  // OPT: q_proj(x) * q_scale, rounded, then scores at scale 1
      for (int64_t e = 0; e < E; ++e) qh[e] = round_to<T>(qh[e] * s.q_scale);
    }
    for (int64_t e = 0; e < padded; ++e) q[h * padded + e] = e < E ? qh[e] : 0.0f;
  }
  const bool* mask = key_mask ? key_mask + b * s.max_len : nullptr;
  for (int64_t h0 = h_begin; h0 < h_end; h0 += 4) {
    const float* qh = q + h0 * padded;
    float* sc = scores + h0 * stride;
    const int64_t h = g * group + h0;
    switch (std::min<int64_t>(4, h_end - h0)) {
      case 4: attend_heads<4>(s, qh, padded, keys, values, k_new, v_new, mask, sc, stride, h, out_row); break;
      case 3: attend_heads<3>(s, qh, padded, keys, values, k_new, v_new, mask, sc, stride, h, out_row); break;
      case 2: attend_heads<2>(s, qh, padded, keys, values, k_new, v_new, mask, sc, stride, h, out_row); break;
      default: attend_heads<1>(s, qh, padded, keys, values, k_new, v_new, mask, sc, stride, h, out_row); break;
    }
  }
}

// Heads per task: a whole group where there are tasks enough for every thread twice over (a
// batched step), else one, as many tasks as query heads (a step of one row: SmolVLM2's three
// groups would leave one of two threads a third of the work, and 15 of 16 threads idle where a
// model has one or two key/value heads).
inline int64_t heads_per_task(const DecodeShape& s, int64_t team) {
  return s.B * s.Hkv >= 2 * team ? s.H / s.Hkv : 1;
}

// Requests the cached keys and values [0, slot) of pair = b Hkv + g (row b, kv head g) into L2 (prefetcht1) while the task before
// it runs. A task's rows are two short runs (SmolVLM2: 45 slots x 128 bytes each) that the
// hardware prefetcher had barely ramped up on before they ended: without this, the first loads
// of each key and value row were most of a batched step's attention.
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
VLMFAST_INLINE void prefetch_group(const DecodeShape& s, const T* k_cache, const T* v_cache, int64_t pair) {
  const int64_t offset = pair * s.max_len * s.E;
  const int64_t bytes = std::min<int64_t>(kPrefetchBytes, s.slot * s.E * static_cast<int64_t>(sizeof(T)));
  const char* keys = reinterpret_cast<const char*>(k_cache + offset);
  const char* values = reinterpret_cast<const char*>(v_cache + offset);
  for (int64_t i = 0; i < bytes; i += 64) {
    __builtin_prefetch(keys + i, 0, 2);
    __builtin_prefetch(values + i, 0, 2);
  }
}

// Tasks begin, begin + step, ... of the step's B Hkv (G / per) tasks, compiled for the widest
// vectors the CPU has; the next task's cached rows are requested while one runs.
#define VLMFAST_DEFINE_ATTEND(T, SUFFIX)                                                          \
  VLMFAST_MULTIVERSION void attend_##SUFFIX(const DecodeShape& s, float* qkv, const float* cos,  \
                                            const float* sin, const int64_t* positions,          \
                                            void* k_cache, void* v_cache,                        \
                                            const bool* key_mask, int64_t begin, int64_t step,   \
                                            float* scratch, void* out) {                         \
    const int64_t width = (s.H + 2 * s.Hkv) * s.E, half = s.E / 2;                                \
    const int64_t group = s.H / s.Hkv, per = heads_per_task(s, step), parts = group / per;        \
    const int64_t tasks = s.B * s.Hkv * parts;                                                    \
    T* keys = static_cast<T*>(k_cache);                                                           \
    T* values = static_cast<T*>(v_cache);                                                         \
    if (begin < tasks) prefetch_group(s, keys, values, begin / parts);                            \
    for (int64_t task = begin; task < tasks; task += step) {                                      \
      const int64_t pair = task / parts, part = task % parts, next = (task + step) / parts;       \
      const int64_t b = pair / s.Hkv, g = pair % s.Hkv;                                           \
      if (task + step < tasks && next != pair) prefetch_group(s, keys, values, next);             \
      const int64_t row = s.kind == kDecodeLlama ? positions[b] * half : 0; /* OPT: no tables */  \
      attend_group<T>(s, qkv + b * width, cos + row, sin + row, keys, values, key_mask, b, g,     \
                      part * per, (part + 1) * per, scratch, static_cast<T*>(out) + b * s.H * s.E); \
    }                                                                                             \
  }
VLMFAST_DEFINE_ATTEND(float, f32)
VLMFAST_DEFINE_ATTEND(BFloat16, bf16)
#undef VLMFAST_DEFINE_ATTEND

template <typename T>
void attend(const DecodeShape& s, float* qkv, const float* cos, const float* sin, const int64_t* positions,
            void* k, void* v, const bool* mask, int64_t begin, int64_t step, float* scratch, T* out) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    attend_bf16(s, qkv, cos, sin, positions, k, v, mask, begin, step, scratch, out);
  } else {
    attend_f32(s, qkv, cos, sin, positions, k, v, mask, begin, step, scratch, out);
  }
}

// act = silu(gate) * up over n columns (swiglu_row.h: ops.swiglu's formula and roundings), one
// body per dtype built for the CPU it runs on (target_clones).
VLMFAST_MULTIVERSION void silu_times_up_f32(const float* gate, const float* up, float* act, int64_t n) {
  silu_times_up(gate, up, act, n);
}
VLMFAST_MULTIVERSION void silu_times_up_bf16(const float* gate, const float* up, BFloat16* act, int64_t n) {
  silu_times_up(gate, up, act, n);
}

// One row: x = round_T(x + delta) (no delta: x as it is), then out = norm(x), 16 lanes at a time
// (a row's sums in 16 partial sums; lanes past D read as 0 and, for the deviations, are masked).
// RMSNorm: round_T(weight * round_T(x * rsqrt(mean(x^2) + eps))), in the order the eager model
// rounds (normalised in float32, rounded, then scaled). OPT's LayerNorm (`bias`, `layer_norm`):
// round_T((x - mean) / sqrt(var + eps) * weight + bias), computed in float32 and rounded once, as
// torch's layer_norm does for bfloat16 (null weight / bias: 1 / 0).
template <typename T>
VLMFAST_INLINE void residual_norm_row(float* x, const float* delta, const T* weight, const T* bias, T* out,
                                      int64_t D, float eps, bool layer_norm) {
  using gemm_elements::load_n;
  using gemm_elements::rounded;
  using gemm_elements::store_n;
  if (delta != nullptr) {
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = std::min<int64_t>(16, D - i);
      store_n(x + i, rounded<T>(load_n(x + i, n) + load_n(delta + i, n)), n);
    }
  }
  const float count = static_cast<float>(D);
  if (!layer_norm) {
    v16f squares{};
    for (int64_t i = 0; i < D; i += 16) {
      const v16f v = load_n(x + i, std::min<int64_t>(16, D - i));
      squares += v * v;
    }
    const float inv = 1.0f / std::sqrt(hsum_tree(squares) / count + eps);
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = std::min<int64_t>(16, D - i);
      store_n(out + i, load_n(weight + i, n) * rounded<T>(load_n(x + i, n) * inv), n);
    }
    return;
  }
  v16f total{};
  for (int64_t i = 0; i < D; i += 16) total += load_n(x + i, std::min<int64_t>(16, D - i));
  const float mean = hsum_tree(total) / count;
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  v16f squares{};
  for (int64_t i = 0; i < D; i += 16) {
    const int64_t n = std::min<int64_t>(16, D - i);
    const v16f d = load_n(x + i, n) - mean;
    const v16f kept = lane < static_cast<int32_t>(n) ? d : v16f{};
    squares += kept * kept;
  }
  const float inv = 1.0f / std::sqrt(hsum_tree(squares) / count + eps);
  for (int64_t i = 0; i < D; i += 16) {
    const int64_t n = std::min<int64_t>(16, D - i);
    v16f scaled = (load_n(x + i, n) - mean) * inv;
    if (weight != nullptr) scaled = scaled * load_n(weight + i, n);
    if (bias != nullptr) scaled = scaled + load_n(bias + i, n);
    store_n(out + i, scaled, n);
  }
}

// x = round_T(x + delta) and normed = norm(x) for every row (RMSNorm, or OPT's LayerNorm with
// `bias`): each thread keeps its own copy of the residual stream and of its norm (a few KB), so
// none waits for another to compute them. One body per dtype built for the CPU it runs on: the
// scalar loops, built for the baseline x86-64, were ~7 % of a 32-row SmolVLM2 step at 2 threads.
#define VLMFAST_DEFINE_NORM_ROWS(T, SUFFIX)                                                               \
  VLMFAST_MULTIVERSION void residual_norm_rows_##SUFFIX(const DecodeShape& s, float* x, const float* delta, \
                                                        const T* weight, const T* bias, T* normed) {      \
    for (int64_t b = 0; b < s.B; ++b) {                                                                  \
      residual_norm_row<T>(x + b * s.D, delta ? delta + b * s.D : nullptr, weight, bias, normed + b * s.D, \
                           s.D, s.eps, s.kind == kDecodeOPT);                                            \
    }                                                                                                    \
  }
VLMFAST_DEFINE_NORM_ROWS(float, f32)
VLMFAST_DEFINE_NORM_ROWS(BFloat16, bf16)
#undef VLMFAST_DEFINE_NORM_ROWS

template <typename T>
void residual_and_norm(const DecodeShape& s, float* x, const float* delta, const T* weight, const T* bias,
                       T* normed) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    residual_norm_rows_bf16(s, x, delta, weight, bias, normed);
  } else {
    residual_norm_rows_f32(s, x, delta, weight, bias, normed);
  }
}

// ------------------------------------------------------------------ the step
//
// One parallel region; five barriers per layer, each where the next stage reads what every
// thread wrote: after qkv, after attention, after o_proj, after silu(gate) * up, after down.
// Shared buffers: qkv, attended, proj, gate_up, act (each written in one stage and read in the
// next, with a barrier between). Private per thread: the residual stream and its norms.

// The MLP of rows [i0, i1) of the intermediate: act = silu(gate) * up (Llama, gate_up = [gate; up])
// or relu(fc1) (OPT), each value rounded to T where the eager model rounds it.
template <typename T>
void mlp_activation(const DecodeShape& s, const DecodeLayer& layer, const T* normed, float* gate_up, T* act,
                    int64_t i0, int64_t i1) {
  const int64_t B = s.B, I = s.I;
  const T* gu = static_cast<const T*>(layer.gate_up);
  const T* gu_bias = static_cast<const T*>(layer.gate_up_bias);
  if (s.kind == kDecodeOPT) {
    gemv_rows(gu, gu_bias, normed, gate_up, B, I, s.D, i0, i1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = i0; i < i1; ++i) act[b * I + i] = from_float<T>(std::max(gate_up[b * I + i], 0.0f));
    return;
  }
  gemv_rows(gu, gu_bias, normed, gate_up, B, 2 * I, s.D, i0, i1);
  gemv_rows(gu, gu_bias, normed, gate_up, B, 2 * I, s.D, I + i0, I + i1);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gate_up + b * 2 * I;
    if constexpr (std::is_same_v<T, float>) {
      silu_times_up_f32(g + i0, g + I + i0, act + b * I + i0, i1 - i0);
    } else {
      silu_times_up_bf16(g + i0, g + I + i0, act + b * I + i0, i1 - i0);
    }
  }
}

template <typename T>
void step(const DecodeShape& s, const int64_t* tokens, const int64_t* positions, const T* embed,
          const std::vector<DecodeLayer>& layers, const T* final_norm, const T* final_norm_bias,
          const T* head, const DecodePositions& tables, const bool* key_mask, float* logits, int threads) {
  const int64_t B = s.B, D = s.D, E = s.E, I = s.I;
  const int64_t Q = s.H * E, W = (s.H + 2 * s.Hkv) * E;
  const int team_size = resolve_threads(threads);
  std::vector<float> qkv(B * W), proj(B * D), gate_up(B * 2 * I);
  std::vector<T> attended(B * Q), act(B * I);
  const T* learned = static_cast<const T*>(tables.learned);

#pragma omp parallel num_threads(team_size)
  {
    int tid = 0, team = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    std::vector<float> x(B * D), attend_space(AttendScratch(s).floats());
    std::vector<T> normed(B * D);
    for (int64_t b = 0; b < B; ++b) {
      const T* token = embed + tokens[b] * D;
      const T* position = learned ? learned + positions[b] * D : nullptr;  // OPT: embedding + position, rounded
      for (int64_t i = 0; i < D; ++i) {
        x[b * D + i] = position ? round_to<T>(to_float(token[i]) + to_float(position[i])) : to_float(token[i]);
      }
    }
    int64_t n0, n1, i0, i1;
    share(I, tid, team, i0, i1);  // this thread's MLP columns: gate rows i, up rows I + i (OPT: fc1 rows i)
    for (size_t l = 0; l < layers.size(); ++l) {
      const DecodeLayer& layer = layers[l];
      // the previous layer's MLP residual (proj = its down output), then this layer's norm
      residual_and_norm(s, x.data(), l == 0 ? nullptr : proj.data(), static_cast<const T*>(layer.input_norm),
                        static_cast<const T*>(layer.input_norm_bias), normed.data());
      share(W, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.qkv), static_cast<const T*>(layer.qkv_bias), normed.data(),
                qkv.data(), B, W, D, n0, n1);
#pragma omp barrier
      attend<T>(s, qkv.data(), tables.cos, tables.sin, positions, layer.k_cache, layer.v_cache, key_mask, tid,
                team, attend_space.data(), attended.data());
#pragma omp barrier
      share(D, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.o_proj), static_cast<const T*>(layer.o_bias), attended.data(),
                proj.data(), B, D, Q, n0, n1);
#pragma omp barrier
      residual_and_norm(s, x.data(), proj.data(), static_cast<const T*>(layer.post_norm),
                        static_cast<const T*>(layer.post_norm_bias), normed.data());
      mlp_activation(s, layer, normed.data(), gate_up.data(), act.data(), i0, i1);
#pragma omp barrier
      share(D, tid, team, n0, n1);
      gemv_rows(static_cast<const T*>(layer.down), static_cast<const T*>(layer.down_bias), act.data(),
                proj.data(), B, D, I, n0, n1);
#pragma omp barrier
    }
    residual_and_norm(s, x.data(), proj.data(), final_norm, final_norm_bias, normed.data());
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
  if (s.position_rows < 1 || s.embed_rows < 1) fail("expected non-empty position tables and embedding");
  if (s.kind != kDecodeLlama && s.kind != kDecodeOPT) fail("unknown decoder kind");
  if (static_cast<int64_t>(layers) != s.layers) fail("layer table does not match the layer count");
}

// Every row's token inside the vocabulary and position inside the rotary tables: checked before
// any weight is read (a bad index would read outside the embedding or the tables).
void check_rows(const DecodeShape& s, const int64_t* tokens, const int64_t* positions) {
  for (int64_t b = 0; b < s.B; ++b) {
    if (positions[b] < 0 || positions[b] >= s.position_rows) {
      throw std::invalid_argument("decode_step: positions[" + std::to_string(b) + "] = " +
                                  std::to_string(positions[b]) + " is outside the position tables' " +
                                  std::to_string(s.position_rows) + " rows");
    }
    if (tokens[b] < 0 || tokens[b] >= s.embed_rows) {
      throw std::invalid_argument("decode_step: tokens[" + std::to_string(b) + "] = " +
                                  std::to_string(tokens[b]) + " is outside the embedding's " +
                                  std::to_string(s.embed_rows) + " rows");
    }
  }
}

}  // namespace

void decode_step(const DecodeShape& shape, const int64_t* tokens, const int64_t* positions,
                 const void* embed, const std::vector<DecodeLayer>& layers, const void* final_norm,
                 const void* final_norm_bias, const void* head, const DecodePositions& tables,
                 bool* key_mask, float* logits, int dtype, int threads) {
  check_shape(shape, layers.size());
  check_rows(shape, tokens, positions);
  if ((shape.kind == kDecodeLlama) != (tables.cos != nullptr && tables.sin != nullptr) ||
      (shape.kind == kDecodeOPT) != (tables.learned != nullptr)) {
    throw std::invalid_argument("decode_step: expected rotary tables for a Llama stack, learned positions for OPT");
  }
  if (key_mask != nullptr) {
    for (int64_t b = 0; b < shape.B; ++b) key_mask[b * shape.max_len + shape.slot] = true;
  }
  switch (dtype_from_tag(dtype)) {
    case DType::Float32:
      return step<float>(shape, tokens, positions, static_cast<const float*>(embed), layers,
                         static_cast<const float*>(final_norm), static_cast<const float*>(final_norm_bias),
                         static_cast<const float*>(head), tables, key_mask, logits, threads);
    case DType::BFloat16:
      return step<BFloat16>(shape, tokens, positions, static_cast<const BFloat16*>(embed), layers,
                            static_cast<const BFloat16*>(final_norm),
                            static_cast<const BFloat16*>(final_norm_bias),
                            static_cast<const BFloat16*>(head), tables, key_mask, logits, threads);
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
