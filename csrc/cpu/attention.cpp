// Fused attention on the CPU, flash-attention style: tiles of query rows x 64 keys, online softmax
// (running max m and sum l, rescaling the output accumulator), never the L x S matrix in memory.
//
// Layout of the work. The H / Hkv query heads that share a kv head are processed together: for a
// (batch, kv head) pair the L * G query rows are ordered (position l, head in group g), so a row
// block reads each K/V tile once for the whole group (decode with GQA: L = 1, G = 4 -> one 4-row
// block) and causal limits still follow l. Scores are kept in base-2 units (q is pre-multiplied
// by scale * log2(e), the bias by log2(e)) so the softmax needs only exp2.
//
// Tiles are converted to float32 once, when packed into thread-local buffers padded to a multiple
// of 16 in the head dim ("width"): K and V transposed (width x 64) for the score products, rows
// (64 x width) for the products that run over keys. Each job (a pair, a row block, a key block)
// runs in a function multi-versioned for AVX-512 / AVX2 (see "Jobs" below), and so do the float
// kernels on packed tiles (score tile, accumulate, softmax steps).
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/vec16.h"
#include "cpu/attention_pairs.h"
#include "cpu/gemm.h"

namespace vlmfast::cpu {
namespace {

// ----------------------------------------------------------------------------------------------
// Constants (the 16-lane vector helpers and exp2 are in common/vec16.h).

// A packing lambda inlined into the multi-versioned job that calls it (see TileCache::get).
#define VLMFAST_PACKER __attribute__((always_inline))

constexpr int kLanes = 16;
constexpr int64_t kKeyBlock = 64;                // keys per tile
constexpr int kKeyVectors = kKeyBlock / kLanes;  // vectors per row of a score tile
constexpr int64_t kMaxRowBlock = 64;             // query rows per tile, at most
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ----------------------------------------------------------------------------------------------
// Float kernels on packed tiles. A score tile is (rows, 64): row r at C + r * 64.

// C[r][0:16V] = sum_e A[r][e] * Bt[e][0:16V]: R rows of A (row-major, lda) against the first V
// vectors of each row of a packed (depth, 64) tile. R x V accumulators stay in registers; e runs
// innermost over contiguous Bt.
template <int R, int V = kKeyVectors>
VLMFAST_INLINE void score_rows(const float* A, int64_t lda, const float* Bt, int64_t depth,
                               float* C) {
  v16f acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = v16f{};
  for (int64_t e = 0; e < depth; ++e) {
    v16f b[V];
    for (int c = 0; c < V; ++c) b[c] = vload(Bt + e * kKeyBlock + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + e];
      for (int c = 0; c < V; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) vstore(C + r * kKeyBlock + c * kLanes, acc[r][c]);
}

template <int V>
VLMFAST_INLINE void score_tile_columns(const float* A, int64_t lda, const float* Bt, int64_t depth,
                                       float* C, int64_t rows) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) score_rows<6, V>(A + r * lda, lda, Bt, depth, C + r * kKeyBlock);
  const float* a = A + r * lda;
  float* c = C + r * kKeyBlock;
  switch (rows - r) {
    case 5: score_rows<5, V>(a, lda, Bt, depth, c); break;
    case 4: score_rows<4, V>(a, lda, Bt, depth, c); break;
    case 3: score_rows<3, V>(a, lda, Bt, depth, c); break;
    case 2: score_rows<2, V>(a, lda, Bt, depth, c); break;
    case 1: score_rows<1, V>(a, lda, Bt, depth, c); break;
    default: break;
  }
}

// (rows, 64) score tile C = A Bt, A (rows, depth) with row stride lda, Bt packed (depth, 64).
// Only the first `keys` columns (rounded up to a vector) are computed: the tile of the last,
// partial key block (197 keys: 64, 64, 64, 5) would otherwise cost a full one; the columns
// past them are left as they were, for a caller that masks them (mask_scores writes -inf there).
VLMFAST_MULTIVERSION void tile_scores(const float* A, int64_t lda, const float* Bt, int64_t depth,
                                      float* C, int64_t rows, int64_t keys = kKeyBlock) {
  switch ((std::min(keys, kKeyBlock) + kLanes - 1) / kLanes) {
    case 1: return score_tile_columns<1>(A, lda, Bt, depth, C, rows);
    case 2: return score_tile_columns<2>(A, lda, Bt, depth, C, rows);
    case 3: return score_tile_columns<3>(A, lda, Bt, depth, C, rows);
    default: return score_tile_columns<kKeyVectors>(A, lda, Bt, depth, C, rows);
  }
}

// C[r][0:16V] += sum_c A[r * a_rs + c * a_cs] * B[c][0:16V]. A is read one scalar at a time, so
// any layout works: (a_rs, a_cs) = (64, 1) for a score tile, (1, 64) for its transpose.
template <int R, int V>
VLMFAST_INLINE void accumulate_rows(const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                                    int64_t ldb, int64_t count, float* C, int64_t ldc) {
  v16f acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vload(C + r * ldc + v * kLanes);
  for (int64_t c = 0; c < count; ++c) {
    v16f b[V];
    for (int v = 0; v < V; ++v) b[v] = vload(B + c * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * a_rs + c * a_cs];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) vstore(C + r * ldc + v * kLanes, acc[r][v]);
}

template <int R>
VLMFAST_INLINE void accumulate_row_group(const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                                         int64_t ldb, int64_t count, float* C, int64_t ldc,
                                         int64_t width) {
  int64_t e = 0;
  for (; e + 4 * kLanes <= width; e += 4 * kLanes)
    accumulate_rows<R, 4>(A, a_rs, a_cs, B + e, ldb, count, C + e, ldc);
  switch ((width - e) / kLanes) {
    case 3: accumulate_rows<R, 3>(A, a_rs, a_cs, B + e, ldb, count, C + e, ldc); break;
    case 2: accumulate_rows<R, 2>(A, a_rs, a_cs, B + e, ldb, count, C + e, ldc); break;
    case 1: accumulate_rows<R, 1>(A, a_rs, a_cs, B + e, ldb, count, C + e, ldc); break;
    default: break;
  }
}

// C (rows, width) += A (rows, count) @ B (count, width); width a multiple of 16.
VLMFAST_MULTIVERSION void tile_accumulate(const float* A, int64_t a_rs, int64_t a_cs,
                                          const float* B, int64_t ldb, int64_t count, float* C,
                                          int64_t ldc, int64_t rows, int64_t width) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    accumulate_row_group<4>(A + r * a_rs, a_rs, a_cs, B, ldb, count, C + r * ldc, ldc, width);
  const float* a = A + r * a_rs;
  float* c = C + r * ldc;
  switch (rows - r) {
    case 3: accumulate_row_group<3>(a, a_rs, a_cs, B, ldb, count, c, ldc, width); break;
    case 2: accumulate_row_group<2>(a, a_rs, a_cs, B, ldb, count, c, ldc, width); break;
    case 1: accumulate_row_group<1>(a, a_rs, a_cs, B, ldb, count, c, ldc, width); break;
    default: break;
  }
}

// One online-softmax step over a (rows, 64) tile of base-2 scores, turned into probabilities in
// place: m_new = max(m, rowmax), p = 2^(s - m_new), l = l * 2^(m - m_new) + rowsum(p), and the
// output accumulator rescaled by 2^(m - m_new). While a row has seen only masked keys (m_new =
// -inf) it is evaluated against 0, which keeps p = 0 and avoids -inf - -inf. Written as separate
// passes (row maxima; the rescale factors of 16 rows at a time; exponentials) so that rows do not
// wait on one another's reductions. Returns false, changing nothing, when every score of the tile
// is -inf (a padded or causally hidden key block): then p = 0 and the tile adds nothing.
VLMFAST_MULTIVERSION bool online_softmax_step(float* S, int64_t rows, float* m, float* l,
                                              float* acc, int64_t width) {
  alignas(64) float m_new[kMaxRowBlock], m_old[kMaxRowBlock], ref[kMaxRowBlock],
      alpha[kMaxRowBlock], sums[kMaxRowBlock];
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * kKeyBlock;
    v16f row_max = vload(s);
    for (int c = 1; c < kKeyVectors; ++c) {
      const v16f x = vload(s + c * kLanes);
      row_max = x > row_max ? x : row_max;
    }
    m_old[i] = m[i];
    m_new[i] = hmax_tree(row_max);
  }
  bool any_key = false;
  for (int64_t i = 0; i < rows; ++i) {
    any_key |= m_new[i] > -kInf;
    m_new[i] = std::max(m_old[i], m_new[i]);
  }
  if (!any_key) return false;
  const int64_t padded = (rows + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = rows; i < padded; ++i) m_old[i] = m_new[i] = 0.0f;
  for (int64_t i = 0; i < padded; i += kLanes) {
    v16f top = vload(m_new + i);
    top = top == -kInf ? splat(0.0f) : top;
    vstore(ref + i, top);
    vstore(alpha + i, vexp2(vload(m_old + i) - top));
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * kKeyBlock;
    v16f sum{};
    for (int c = 0; c < kKeyVectors; ++c) {
      const v16f p = vexp2(vload(s + c * kLanes) - ref[i]);
      vstore(s + c * kLanes, p);
      sum += p;
    }
    sums[i] = hsum_tree(sum);
  }
  for (int64_t i = 0; i < rows; ++i) {
    l[i] = l[i] * alpha[i] + sums[i];
    m[i] = m_new[i];
    if (alpha[i] != 1.0f) {
      float* a = acc + i * width;
      for (int64_t e = 0; e < width; e += kLanes) vstore(a + e, vload(a + e) * alpha[i]);
    }
  }
  return true;
}

// Whether any score of a (rows, 64) tile is above -inf, i.e. any key of the tile takes part.
VLMFAST_MULTIVERSION bool tile_has_keys(const float* S, int64_t rows) {
  v16f top = splat(-kInf);
  for (int64_t i = 0; i < rows * kKeyBlock; i += kLanes) {
    const v16f x = vload(S + i);
    top = x > top ? x : top;
  }
  return hmax_tree(top) > -kInf;
}

// P = 2^(s - lse2) in place (lse2: the row's log-sum-exp in base 2, +inf for an empty row).
VLMFAST_MULTIVERSION void tile_probabilities(float* S, const float* lse2, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i)
    for (int c = 0; c < kKeyVectors; ++c) {
      float* s = S + i * kKeyBlock + c * kLanes;
      vstore(s, vexp2(vload(s) - lse2[i]));
    }
}

// dS = P * (dP - D_i) in place of dP.
VLMFAST_MULTIVERSION void tile_score_grads(const float* P, float* dP, const float* delta,
                                           int64_t rows) {
  for (int64_t i = 0; i < rows; ++i)
    for (int c = 0; c < kKeyVectors; ++c) {
      const int64_t at = i * kKeyBlock + c * kLanes;
      vstore(dP + at, vload(P + at) * (vload(dP + at) - delta[i]));
    }
}

// ----------------------------------------------------------------------------------------------
// Work plan, row blocks, thread-local buffers.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  AttentionShape s;
  int64_t group;       // G = H / Hkv query heads per kv head
  int64_t rows;        // L * G query rows per (batch, kv head), ordered (l, g)
  int64_t width;       // E rounded up to 16
  int64_t block_rows;  // query rows per tile
  int64_t row_blocks;
  int64_t key_blocks;
  float q_mult;        // scale * log2(e): q packed with it gives base-2 scores
  bool pair_dots = false;  // bfloat16 inputs: the products on pairs (plan_for)
};

Plan make_plan(const AttentionShape& s, int threads) {
  Plan p;
  p.s = s;
  p.group = s.heads / s.kv_heads;
  p.rows = s.q_len * p.group;
  p.width = ceil_div(s.head_dim, kLanes) * kLanes;
  p.key_blocks = ceil_div(s.kv_len, kKeyBlock);
  p.q_mult = s.scale * kLog2e;
  if (p.rows == 0) {
    p.block_rows = 1;
    p.row_blocks = 0;
    return p;
  }
  // Even blocks of at most 64 rows (197 rows -> 4 x 50, not 3 x 64 + 5); smaller ones when there
  // are too few (batch, kv head) pairs to give every thread two tasks.
  const int64_t outer = std::max<int64_t>(1, s.batch * s.kv_heads);
  int64_t blocks = ceil_div(p.rows, kMaxRowBlock);
  blocks = std::max(blocks, std::min(ceil_div(2 * threads, outer), ceil_div(p.rows, 16)));
  p.block_rows = std::min(kMaxRowBlock, ceil_div(ceil_div(p.rows, blocks), 2) * 2);
  p.row_blocks = ceil_div(p.rows, p.block_rows);
  return p;
}

// The plan of a forward or backward. A bfloat16 problem runs its products on pairs
// (attention_pairs.h) when the GEMM's level has AVX512-BF16 (a lower level forced, as the tests
// do, forces the float32 tiles here too) and when its row blocks are tall enough to repay packing
// K and V as pairs (not decode's few rows per block, whose tiles are packed for one use). Rotary
// tables take either path: q and k are rotated and rounded to bfloat16 on both
// (rotated_elements), the pair path packing the rounded bits.
template <typename T>
Plan plan_for(const AttentionShape& s, int threads) {
  Plan p = make_plan(s, threads);
#if VLMFAST_GEMM_X86
  if constexpr (std::is_same_v<T, BFloat16>)
    p.pair_dots = p.block_rows >= 16 && gemm_isa() >= GemmIsa::Avx512Bf16 &&
                  gemm_isa_available(GemmIsa::Avx512Bf16);
#endif
  return p;
}

// The query rows [first, first + count) of one (batch, kv head): where each one lives.
struct RowBlock {
  int64_t first, count, min_pos, max_pos;
  int64_t pos[kMaxRowBlock];   // query position l
  int64_t head[kMaxRowBlock];  // query head h
  const float* bias[kMaxRowBlock];
  const uint8_t* mask[kMaxRowBlock];
};

VLMFAST_INLINE void describe_rows(const Plan& p, const AttentionBias& bias, int64_t b,
                                  int64_t kv_head, int64_t first, int64_t count, RowBlock& r) {
  r.first = first;
  r.count = count;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = first + i;
    r.pos[i] = row / p.group;
    r.head[i] = kv_head * p.group + row % p.group;
    const int64_t offset =
        b * bias.strides[0] + r.head[i] * bias.strides[1] + r.pos[i] * bias.strides[2];
    r.bias[i] = bias.data ? bias.data + offset : nullptr;
    r.mask[i] = bias.mask ? bias.mask + offset : nullptr;
  }
  r.min_pos = first / p.group;
  r.max_pos = (first + count - 1) / p.group;
}

// Key blocks a row block can see: all, or up to its last row's position when causal.
VLMFAST_INLINE int64_t visible_key_blocks(const Plan& p, const RowBlock& r) {
  if (!p.s.causal) return p.key_blocks;
  return std::min(p.key_blocks, ceil_div(std::min(p.s.kv_len, r.max_pos + 1), kKeyBlock));
}

// Adds the bias (in base 2) and -inf for keys past the causal diagonal and past the last key.
VLMFAST_INLINE void mask_scores(const Plan& p, const AttentionBias& bias, const RowBlock& r,
                                int64_t first_key, int64_t keys, float* S) {
  const bool causal = p.s.causal && first_key + keys - 1 > r.min_pos;
  const int64_t key_stride = bias.strides[3];
  for (int64_t i = 0; i < r.count; ++i) {
    float* s = S + i * kKeyBlock;
    if (r.bias[i]) {
      const float* b = r.bias[i] + first_key * key_stride;
      if (key_stride == 1) {
        for (int64_t j = 0; j < keys; ++j) s[j] += kLog2e * b[j];
      } else {
        for (int64_t j = 0; j < keys; ++j) s[j] += kLog2e * b[j * key_stride];
      }
    } else if (r.mask[i]) {
      const uint8_t* keep = r.mask[i] + first_key * key_stride;
      for (int64_t j = 0; j < keys; ++j) s[j] = keep[j * key_stride] ? s[j] : -kInf;
    }
    int64_t end = keys;
    if (causal) end = std::clamp<int64_t>(r.pos[i] - first_key + 1, 0, keys);
    for (int64_t j = end; j < kKeyBlock; ++j) s[j] = -kInf;
  }
}

struct alignas(64) Chunk {
  Chunk() {}  // left uninitialised: every buffer is written before it is read, and zeroing
              // ~64 KB of scratch per thread showed in a decode step
  float f[kLanes];
};

// A float buffer aligned to 64 bytes that grows on demand.
class Buffer {
 public:
  float* get(int64_t n) {
    const size_t chunks = static_cast<size_t>(ceil_div(std::max<int64_t>(n, 1), kLanes));
    if (chunks_.size() < chunks) chunks_.resize(chunks);
    return chunks_.front().f;
  }

 private:
  std::vector<Chunk> chunks_;
};

// The packed tiles of one job, each packed on first use and kept for the rest of the job (a K
// tile serves every row block of its (batch, kv head)); with keep = false a single slot is
// refilled on every use, which bounds the memory of long sequences.
class TileCache {
 public:
  void reset(int64_t tiles, int64_t tile_floats, bool keep) {
    keep_ = keep;
    tile_ = tile_floats;
    base_ = data_.get((keep ? tiles : 1) * tile_floats);
    ready_.assign(keep ? static_cast<size_t>(tiles) : 0, 0);
  }

  // Forced inline with its fill (the callers' lambdas are VLMFAST_PACKER): a call left out of
  // line would run the packing compiled for baseline x86-64, outside the target_clones.
  template <typename Fill>
  VLMFAST_INLINE float* get(int64_t i, Fill&& fill) {
    if (!keep_) {
      fill(base_);
      return base_;
    }
    float* tile = base_ + i * tile_;
    if (!ready_[i]) {
      fill(tile);
      ready_[i] = 1;
    }
    return tile;
  }

 private:
  Buffer data_;
  std::vector<uint8_t> ready_;
  float* base_ = nullptr;
  int64_t tile_ = 0;
  bool keep_ = false;
};

// Whether a job may keep `floats` of packed tiles (per thread).
bool worth_keeping(int64_t floats) { return floats <= (int64_t{1} << 22); }

struct Scratch {
  Buffer q, dout, kt, vt, krows, scores, dscores, acc, dk, dv, stats, dq;
  Buffer probs, pair_rows;  // the pair path's: P and dS rounded to pairs; a row block's tiles
  Buffer rotated_keys;      // the pair path's: a key block rotated (rotary tables), bfloat16 rows
  TileCache keys, values, rows;
};

// ----------------------------------------------------------------------------------------------
// Packing (element type -> float32 tiles).

template <typename T>
VLMFAST_INLINE const T* row_of(const AttentionInput& t, int64_t b, int64_t head, int64_t pos) {
  return static_cast<const T*>(t.data) + b * t.strides[0] + head * t.strides[1] +
         pos * t.strides[2];
}

template <typename T>
VLMFAST_INLINE T* row_of(const AttentionOutput& t, int64_t b, int64_t head, int64_t pos) {
  return static_cast<T*>(t.data) + b * t.strides[0] + head * t.strides[1] + pos * t.strides[2];
}

// Rotates the float row x in place by the rotary table row `pos` (sign -1: the inverse
// rotation, which takes a gradient back through it): for i < R/2, with c, s that row's cos, sin,
// (x_i, x_{i+R/2}) -> (x_i c - sign x_{i+R/2} s, x_{i+R/2} c + sign x_i s).
VLMFAST_INLINE void rotate_row(const Plan& p, int64_t pos, float* x, float sign) {
  const int64_t half = p.s.rotary_half;
  const float* __restrict c = p.s.rotary_cos + pos * p.s.rotary_stride;
  const float* __restrict sn = p.s.rotary_sin + pos * p.s.rotary_stride;
  float* __restrict lo = x;
  float* __restrict hi = x + half;  // [0, half) and [half, 2 half) never overlap
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = lo[i], x2 = hi[i], s = sign * sn[i];
    lo[i] = x1 * c[i] - x2 * s;
    hi[i] = x2 * c[i] + x1 * s;
  }
}

// store(e, x_e) for the E elements of the row src rotated by the table row `pos`: rotated in
// float32 and rounded to T, as apply_rotary_emb's output in T would be (and as the GPU kernel
// and transformers' bfloat16 models rotate): the kernel attends to the q and k that rotating
// first and attending after would give, whichever path its tiles take.
template <typename T, typename Store>
VLMFAST_INLINE void rotated_elements(const Plan& p, int64_t pos, const T* __restrict src,
                                     Store&& store) {
  const int64_t half = p.s.rotary_half, E = p.s.head_dim;
  const float* __restrict c = p.s.rotary_cos + pos * p.s.rotary_stride;
  const float* __restrict sn = p.s.rotary_sin + pos * p.s.rotary_stride;
  auto rounded = [](float x) { return to_float(from_float<T>(x)); };
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(src[i]), x2 = to_float(src[i + half]);
    store(i, rounded(x1 * c[i] - x2 * sn[i]));
    store(i + half, rounded(x2 * c[i] + x1 * sn[i]));
  }
  for (int64_t e = 2 * half; e < E; ++e) store(e, to_float(src[e]));
}

// d (width) = the E elements of src rotated by the table row `pos` (rotated_elements) times
// mult as they are converted (one pass: no separate copy and rotate), zero-padded past E.
template <typename T>
VLMFAST_INLINE void convert_rotated(const Plan& p, int64_t pos, const T* __restrict src,
                                    float mult, float* __restrict d) {
  rotated_elements(p, pos, src, [&](int64_t e, float x) { d[e] = x * mult; });
  for (int64_t e = p.s.head_dim; e < p.width; ++e) d[e] = 0.0f;
}

// dst (count, width) = t's rows of the block, times mult, zero-padded past E; rotated by each
// row's position when `rotate` and the plan has rotary tables (q: yes; dO: no).
template <typename T>
VLMFAST_INLINE void pack_query_rows(const AttentionInput& t, const Plan& p, int64_t b,
                                    const RowBlock& r, float mult, float* dst,
                                    bool rotate = false) {
  const int64_t E = p.s.head_dim;
  rotate = rotate && p.s.rotary_half > 0;
  for (int64_t i = 0; i < r.count; ++i) {
    const T* src = row_of<T>(t, b, r.head[i], r.pos[i]);
    float* d = dst + i * p.width;
    if (rotate) {
      convert_rotated(p, r.pos[i], src, mult, d);
      continue;
    }
    for (int64_t e = 0; e < E; ++e) d[e] = to_float(src[e]) * mult;
    for (int64_t e = E; e < p.width; ++e) d[e] = 0.0f;
  }
}

// One butterfly stage of a 16 x 16 transpose: rows i and i + S (bit S of i clear) swap their
// off-diagonal S x S blocks. The four stages S = 8, 4, 2, 1 swap every bit of the row index with
// the same bit of the lane index, i.e. transpose (64 two-source shuffles for 256 floats).
template <int S>
VLMFAST_INLINE void transpose_stage(v16f (&r)[kLanes], const v16i& lo, const v16i& hi) {
  for (int i = 0; i < kLanes; ++i) {
    if (i & S) continue;
    const v16f a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + S] = __builtin_shuffle(a, b, hi);
  }
}

VLMFAST_INLINE void transpose16(v16f (&r)[kLanes]) {
  transpose_stage<8>(r, v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                     v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose_stage<4>(r, v16i{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                     v16i{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_stage<2>(r, v16i{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                     v16i{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_stage<1>(r, v16i{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                     v16i{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

// `count` (<= 16) elements of src as floats, zero past count.
template <typename T>
VLMFAST_INLINE v16f load_converted(const T* src, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kLanes) return vload(src);
  }
  alignas(64) float tmp[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) tmp[i] = i < count ? to_float(src[i]) : 0.0f;
  return vload(tmp);
}

// dst (width, 64) = the transpose of `keys` rows of src (row stride `stride`), zero-padded;
// 16 x 16 blocks transposed in registers.
template <typename T>
VLMFAST_INLINE void pack_transposed(const T* src, int64_t stride, int64_t keys, const Plan& p,
                                    float* dst) {
  const int64_t E = p.s.head_dim;
  for (int64_t j0 = 0; j0 < kKeyBlock; j0 += kLanes) {
    for (int64_t e0 = 0; e0 < p.width; e0 += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, E - e0);
      v16f r[kLanes];
      for (int i = 0; i < kLanes; ++i)
        r[i] = j0 + i < keys ? load_converted(src + (j0 + i) * stride + e0, count) : v16f{};
      transpose16(r);
      for (int t = 0; t < kLanes; ++t) vstore(dst + (e0 + t) * kKeyBlock + j0, r[t]);
    }
  }
}

// Float rows of a multiple-of-16 head dim are used where they are, without packing.
template <typename T>
VLMFAST_INLINE bool rows_in_place(const Plan& p) {
  return std::is_same_v<T, float> && p.s.head_dim == p.width;
}

// dst (keys, width) = `keys` rows of src (row stride `stride`) as floats, zero-padded past E.
template <typename T>
VLMFAST_INLINE void pack_key_rows(const T* src, int64_t stride, int64_t keys, const Plan& p,
                                  float* dst) {
  const int64_t E = p.s.head_dim;
  for (int64_t j = 0; j < keys; ++j) {
    const T* row = src + j * stride;
    float* d = dst + j * p.width;
    for (int64_t e = 0; e < E; ++e) d[e] = to_float(row[e]);
    for (int64_t e = E; e < p.width; ++e) d[e] = 0.0f;
  }
}

// `keys` rows from src as a float tile with row stride ld: in place, or packed into `buffer`.
template <typename T>
VLMFAST_INLINE const float* key_rows(const T* src, int64_t stride, int64_t keys, const Plan& p,
                                     float* buffer, int64_t& ld) {
  if (rows_in_place<T>(p)) {
    ld = stride;
    return reinterpret_cast<const float*>(src);
  }
  pack_key_rows(src, stride, keys, p, buffer);
  ld = p.width;
  return buffer;
}

// Writes the block's rows of a (count, width) float accumulator times mult (the accumulator
// is consumed: with `unrotate` and rotary tables, each row is first rotated back in place).
template <typename T>
VLMFAST_INLINE void store_query_rows(const AttentionOutput& t, const Plan& p, int64_t b,
                                     const RowBlock& r, float* acc, float mult,
                                     bool unrotate = false) {
  unrotate = unrotate && p.s.rotary_half > 0;
  for (int64_t i = 0; i < r.count; ++i) {
    T* dst = row_of<T>(t, b, r.head[i], r.pos[i]);
    float* a = acc + i * p.width;
    if (unrotate) rotate_row(p, r.pos[i], a, -1.0f);
    for (int64_t e = 0; e < p.s.head_dim; ++e) dst[e] = from_float<T>(a[e] * mult);
  }
}

// Packs the key tile [first_key, first_key + keys): kt (width, 64) = its transpose, rotated by
// the key positions when the plan has rotary tables. Returns the (rotated) rows as floats with
// row stride ld when rotary or want_rows (rotary: rows in `buffer`, converted and rotated once,
// then transposed from there), else nullptr.
template <typename T>
VLMFAST_INLINE const float* pack_keys(const T* src, int64_t stride, int64_t keys,
                                      int64_t first_key, const Plan& p, bool want_rows,
                                      float* kt, float* buffer, int64_t& ld) {
  if (p.s.rotary_half == 0) {
    pack_transposed(src, stride, keys, p, kt);
    return want_rows ? key_rows(src, stride, keys, p, buffer, ld) : nullptr;
  }
  for (int64_t j = 0; j < keys; ++j)
    convert_rotated(p, first_key + j, src + j * stride, 1.0f, buffer + j * p.width);
  pack_transposed(static_cast<const float*>(buffer), p.width, keys, p, kt);
  ld = p.width;
  return buffer;
}

// ----------------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  AttentionInput q, k, v;
  AttentionBias bias;
  AttentionOutput out;
  float* lse;
  int64_t lse_head_stride;  // L for a dense (B, H, L) lse; T for varlen's packed (H, T)
};

#if VLMFAST_GEMM_X86
// ----------------------------------------------------------------------------------------------
// The pair path (bfloat16 inputs, attention_pairs.h's layouts): tiles are built from the
// inputs' bits as they are, or from q and k rotated and rounded (rotated_elements) where the
// plan has rotary tables.

// The pair path's buffer for a key block's rotated rows (key_block_rows): kKeyBlock x width
// bfloat16; none without rotary tables.
VLMFAST_INLINE uint16_t* rotated_key_buffer(const Plan& p, Scratch& w) {
  if (p.s.rotary_half == 0) return nullptr;
  return reinterpret_cast<uint16_t*>(w.rotated_keys.get(kKeyBlock * p.width / 2));
}

// d (width) = the bits of the E elements of src, rotated by the table row `pos` when `rotate`,
// zero-padded past E.
VLMFAST_INLINE void row_bits(const Plan& p, const BFloat16* src, bool rotate, int64_t pos,
                             uint16_t* d) {
  const int64_t E = p.s.head_dim;
  if (rotate)
    rotated_elements(p, pos, src, [&](int64_t e, float x) { d[e] = from_float<BFloat16>(x).bits; });
  else
    for (int64_t e = 0; e < E; ++e) d[e] = src[e].bits;
  for (int64_t e = E; e < p.width; ++e) d[e] = 0;
}

// dst (count, width) bfloat16 = the block's rows of t, rotated by their positions when `rotate`
// and the plan has rotary tables (q: yes; dO: no), zero-padded past E (q_mult is applied to the
// scores instead).
VLMFAST_INLINE void pack_query_pairs(const AttentionInput& t, const Plan& p, int64_t b,
                                     const RowBlock& r, uint16_t* dst, bool rotate = false) {
  rotate = rotate && p.s.rotary_half > 0;
  for (int64_t i = 0; i < r.count; ++i)
    row_bits(p, row_of<BFloat16>(t, b, r.head[i], r.pos[i]), rotate, r.pos[i], dst + i * p.width);
}

// The key block [first_key, first_key + keys) of one (batch, kv head) as bfloat16 rows for
// pack_dim_pairs and pack_row_pairs: the input's rows (stride: theirs), or where the plan has
// rotary tables, rows rotated by the key positions into `buffer` (kKeyBlock x width; stride:
// the width).
VLMFAST_INLINE const BFloat16* key_block_rows(const Plan& p, const AttentionInput& k, int64_t b,
                                              int64_t kv_head, int64_t first_key, int64_t keys,
                                              uint16_t* buffer, int64_t& stride) {
  const BFloat16* src = row_of<BFloat16>(k, b, kv_head, first_key);
  stride = k.strides[2];
  if (p.s.rotary_half == 0) return src;
  for (int64_t j = 0; j < keys; ++j)
    row_bits(p, src + j * stride, true, first_key + j, buffer + j * p.width);
  stride = p.width;
  return reinterpret_cast<const BFloat16*>(buffer);
}

// d[e] = (even[e], odd[e]) for e < E, a null row read as zeros; zero from E to the width.
VLMFAST_INLINE void interleave_rows(const uint16_t* even, const uint16_t* odd, int64_t E,
                                    const Plan& p, uint32_t* d) {
  for (int64_t e = 0; e < E; ++e)
    d[e] = (even ? even[e] : 0u) | static_cast<uint32_t>(odd ? odd[e] : 0u) << 16;
  for (int64_t e = E; e < p.width; ++e) d[e] = 0;
}

// dst[i * width + e] = (x[2i][e], x[2i + 1][e]) over `count` rows x packed as pack_query_pairs
// leaves them (a missing last row as 0): q and dO for the backward's sums over query rows.
VLMFAST_INLINE void pair_packed_rows(const uint16_t* x, int64_t count, const Plan& p, uint32_t* dst) {
  for (int64_t i = 0; 2 * i < count; ++i) {
    const uint16_t* even = x + 2 * i * p.width;
    interleave_rows(even, 2 * i + 1 < count ? even + p.width : nullptr, p.width, p, dst + i * p.width);
  }
}

// The packers below read key / value rows `stride` apart: within a (B, L, 3, H, E) qkv
// projection (the towers' fused q/k/v, viewed per head) 4.6 KB apart at ViT-B widths, a stride
// across pages that the hardware prefetchers do not follow. Each requests the row kRowsAhead
// ahead: SigLIP's attention at (4, 12, 1024, 64), one thread, had spent ~6 % of its time waiting
// on those rows in pack_dim_pairs' scalar transpose.
constexpr int64_t kRowsAhead = 8;

VLMFAST_INLINE void prefetch_row(const BFloat16* row, int64_t E) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < E * static_cast<int64_t>(sizeof(BFloat16)); at += 64) __builtin_prefetch(bytes + at);
}

// kp[i * 64 + j] = pair i of key j (elements 2i, 2i + 1), for the `keys` rows of src; zero past
// E and past the last key (K for the scores, V for the backward's dP = dO V^T).
VLMFAST_INLINE void pack_dim_pairs(const BFloat16* src, int64_t stride, int64_t keys,
                                   const Plan& p, uint32_t* kp) {
  const int64_t E = p.s.head_dim, pairs = p.width / 2;
  auto element = [&](const BFloat16* k, int64_t e) -> uint32_t { return e < E ? k[e].bits : 0u; };
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    const BFloat16* k = src + j * stride;
    if (j + kRowsAhead < keys) prefetch_row(src + (j + kRowsAhead) * stride, E);
    for (int64_t i = 0; i < pairs; ++i)
      kp[i * kKeyBlock + j] = j < keys ? element(k, 2 * i) | element(k, 2 * i + 1) << 16 : 0u;
  }
}

// vp[i * width + e] = (v[2i][e], v[2i + 1][e]) for the `keys` rows of src; zero past E and past
// the last key (its probabilities are 0, but 0 * NaN of an unwritten row would not be). V for
// P V, K for the backward's dS K.
VLMFAST_INLINE void pack_row_pairs(const BFloat16* src, int64_t stride, int64_t keys,
                                   const Plan& p, uint32_t* vp) {
  auto row = [&](int64_t j) {
    return j < keys ? reinterpret_cast<const uint16_t*>(src + j * stride) : nullptr;
  };
  for (int64_t i = 0; i < kKeyBlock / 2; ++i) {
    for (int64_t j = 2 * i + kRowsAhead; j < std::min(2 * i + kRowsAhead + 2, keys); ++j)
      prefetch_row(src + j * stride, p.s.head_dim);
    interleave_rows(row(2 * i), row(2 * i + 1), p.s.head_dim, p, vp + i * p.width);
  }
}
#endif

// The online softmax of a row block over key blocks [kb_begin, kb_end), on either path's tiles:
// scores(kb, first_key, keys, s) leaves the key block's base-2 scores in s (its `keys` columns
// at least), add_pv(kb, first_key, keys, s, acc) adds p v into acc. Leaves the row maxima m
// (base 2), sums l and the unnormalised output acc (count, width).
template <typename Scores, typename AddPV>
VLMFAST_INLINE void online_softmax_rows(const Plan& p, const AttentionBias& bias, const RowBlock& r,
                                        int64_t kb_begin, int64_t kb_end, float* s, float* m,
                                        float* l, float* acc, Scores&& scores, AddPV&& add_pv) {
  std::fill(m, m + r.count, -kInf);
  std::fill(l, l + r.count, 0.0f);
  std::fill(acc, acc + r.count * p.width, 0.0f);
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_key = kb * kKeyBlock;
    const int64_t keys = std::min(kKeyBlock, p.s.kv_len - first_key);
    scores(kb, first_key, keys, s);
    mask_scores(p, bias, r, first_key, keys, s);  // (and -inf past the keys)
    if (!online_softmax_step(s, r.count, m, l, acc, p.width)) continue;  // s = p
    add_pv(kb, first_key, keys, s, acc);
  }
}

#if VLMFAST_GEMM_X86
// forward_rows (below) on pairs.
VLMFAST_INLINE void forward_rows_pairs(const Plan& p, const ForwardArgs& a, int64_t b,
                                       int64_t kv_head, const RowBlock& r, int64_t kb_begin,
                                       int64_t kb_end, Scratch& w, float* m, float* l, float* acc) {
  namespace ap = attention_pairs;
  const int64_t pairs = p.width / 2;
  auto* q = reinterpret_cast<uint16_t*>(w.q.get(kMaxRowBlock * p.width));
  auto* probs = reinterpret_cast<uint32_t*>(w.probs.get(kMaxRowBlock * kKeyBlock / 2));
  pack_query_pairs(a.q, p, b, r, q, /*rotate=*/true);
  auto scores = [&](int64_t kb, int64_t first_key, int64_t keys, float* s) VLMFAST_PACKER {
    const float* kt = w.keys.get(kb, [&](float* t) VLMFAST_PACKER {
      int64_t stride = 0;
      const BFloat16* k = key_block_rows(p, a.k, b, kv_head, first_key, keys,
                                         rotated_key_buffer(p, w), stride);
      pack_dim_pairs(k, stride, keys, p, reinterpret_cast<uint32_t*>(t));
    });
    ap::tile_scores(reinterpret_cast<const uint32_t*>(q), pairs, reinterpret_cast<const uint32_t*>(kt),
                    pairs, p.q_mult, s, r.count, keys);
  };
  auto add_pv = [&](int64_t kb, int64_t first_key, int64_t keys, const float* s, float* out) VLMFAST_PACKER {
    const float* vt = w.values.get(kb, [&](float* t) VLMFAST_PACKER {
      pack_row_pairs(row_of<BFloat16>(a.v, b, kv_head, first_key), a.v.strides[2], keys, p,
                     reinterpret_cast<uint32_t*>(t));
    });
    ap::round_pairs_along_keys(s, r.count, probs);
    ap::tile_accumulate(probs, kKeyBlock / 2, 1, reinterpret_cast<const uint32_t*>(vt), p.width,
                        (keys + 1) / 2, out, p.width, r.count, p.width);
  };
  online_softmax_rows(p, a.bias, r, kb_begin, kb_end, w.scores.get(kMaxRowBlock * kKeyBlock), m, l,
                      acc, scores, add_pv);
}
#endif

// One row block's online softmax over key blocks [kb_begin, kb_end) (online_softmax_rows).
template <typename T>
VLMFAST_INLINE void forward_rows(const Plan& p, const ForwardArgs& a, int64_t b, int64_t kv_head,
                                 const RowBlock& r, int64_t kb_begin, int64_t kb_end, Scratch& w,
                                 float* m, float* l, float* acc) {
#if VLMFAST_GEMM_X86
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (p.pair_dots) return forward_rows_pairs(p, a, b, kv_head, r, kb_begin, kb_end, w, m, l, acc);
  }
#endif
  const int64_t width = p.width;
  float* q = w.q.get(kMaxRowBlock * width);
  pack_query_rows<T>(a.q, p, b, r, p.q_mult, q, /*rotate=*/true);
  auto scores = [&](int64_t kb, int64_t first_key, int64_t keys, float* s) VLMFAST_PACKER {
    const float* kt = w.keys.get(kb, [&](float* t) VLMFAST_PACKER {
      int64_t ld;
      pack_keys(row_of<T>(a.k, b, kv_head, first_key), a.k.strides[2], keys, first_key, p, false, t,
                w.krows.get(kKeyBlock * width), ld);
    });
    tile_scores(q, width, kt, p.s.head_dim, s, r.count, keys);  // q k^T (scaled, base 2)
  };
  auto add_pv = [&](int64_t kb, int64_t first_key, int64_t keys, const float* s, float* out) VLMFAST_PACKER {
    const T* v_rows = row_of<T>(a.v, b, kv_head, first_key);
    int64_t ldv = width;
    const float* v = nullptr;
    if (rows_in_place<T>(p)) {
      v = reinterpret_cast<const float*>(v_rows);
      ldv = a.v.strides[2];
    } else {
      v = w.values.get(kb, [&](float* t) VLMFAST_PACKER { pack_key_rows(v_rows, a.v.strides[2], keys, p, t); });
    }
    tile_accumulate(s, kKeyBlock, 1, v, ldv, keys, out, width, r.count, width);
  };
  online_softmax_rows(p, a.bias, r, kb_begin, kb_end, w.scores.get(kMaxRowBlock * kKeyBlock), m, l,
                      acc, scores, add_pv);
}

// out = acc / l and lse = ln(2) * m + ln(l); a row with l = 0 saw no key: out = 0, lse = -inf.
template <typename T>
VLMFAST_INLINE void finish_rows(const Plan& p, const ForwardArgs& a, int64_t b, const RowBlock& r,
                                const float* m, const float* l, const float* acc) {
  for (int64_t i = 0; i < r.count; ++i) {
    T* out = row_of<T>(a.out, b, r.head[i], r.pos[i]);
    const float* row = acc + i * p.width;
    const bool empty = !(l[i] > 0.0f);
    const float inv = empty ? 0.0f : 1.0f / l[i];
    for (int64_t e = 0; e < p.s.head_dim; ++e) out[e] = from_float<T>(row[e] * inv);
    if (a.lse == nullptr) continue;
    a.lse[b * p.s.heads * p.s.q_len + r.head[i] * a.lse_head_stride + r.pos[i]] =
        empty ? -kInf : m[i] * kLn2 + std::log(l[i]);
  }
}

// How the forward splits its work. Enough (batch, kv head) pairs: one job per pair, which packs
// each K/V tile once for all its row blocks. Otherwise one job per row block; and when even those
// are fewer than the threads (decode: a handful of query rows, thousands of keys), the keys are
// split too and the partial (m, l, acc) of the splits merged afterwards.
struct ForwardSchedule {
  int64_t pairs, tasks, splits, jobs, slot;  // slot: floats of one split's (m, l, acc)
  bool per_pair, keep;

  // allow_splits = false: varlen, whose segments' tasks share one team, never splits keys.
  ForwardSchedule(const Plan& p, int threads, bool allow_splits = true) {
    pairs = p.s.batch * p.s.kv_heads;
    tasks = pairs * p.row_blocks;
    per_pair = pairs >= 4 * threads;
    splits = 1;
    // Split the keys so that the jobs are a multiple of the threads: 3 decode tasks (one per kv
    // head) on 2 threads would otherwise take two rounds of whole tasks.
    if (allow_splits && !per_pair && threads > 1 && p.key_blocks > 1 && tasks < 4 * threads &&
        tasks % threads)
      splits = std::min(p.key_blocks, int64_t{threads} / std::gcd(tasks, int64_t{threads}));
    slot = p.block_rows * (p.width + 2);
    jobs = per_pair ? pairs : tasks * splits;
    keep = per_pair && p.row_blocks > 1 && worth_keeping(2 * p.key_blocks * kKeyBlock * p.width);
  }
};

template <typename T>
VLMFAST_INLINE void forward_job(const Plan& p, const ForwardArgs& a, const ForwardSchedule& sch,
                                int64_t job, Scratch& w, float* partial) {
  const int64_t task = sch.per_pair ? job * p.row_blocks : job / sch.splits;
  const int64_t split = sch.per_pair ? 0 : job % sch.splits;
  const int64_t pair = task / p.row_blocks;
  const int64_t b = pair / p.s.kv_heads, kv_head = pair % p.s.kv_heads;
  w.keys.reset(p.key_blocks, p.width * kKeyBlock, sch.keep);
  w.values.reset(p.key_blocks, kKeyBlock * p.width, sch.keep);
  RowBlock r;
  const int64_t rb_end = sch.per_pair ? p.row_blocks : task % p.row_blocks + 1;
  for (int64_t rb = task % p.row_blocks; rb < rb_end; ++rb) {
    const int64_t first = rb * p.block_rows;
    describe_rows(p, a.bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
    const int64_t kb_end = visible_key_blocks(p, r);
    if (sch.splits == 1) {
      float* stats = w.stats.get(2 * kMaxRowBlock);
      float* acc = w.acc.get(kMaxRowBlock * p.width);
      forward_rows<T>(p, a, b, kv_head, r, 0, kb_end, w, stats, stats + kMaxRowBlock, acc);
      finish_rows<T>(p, a, b, r, stats, stats + kMaxRowBlock, acc);
    } else {
      float* part = partial + job * sch.slot;
      forward_rows<T>(p, a, b, kv_head, r, kb_end * split / sch.splits,
                      kb_end * (split + 1) / sch.splits, w, part, part + p.block_rows,
                      part + 2 * p.block_rows);
    }
  }
}

// Merges the key splits of one task: M = max_s m_s; l = sum_s 2^(m_s - M) l_s;
// acc = sum_s 2^(m_s - M) acc_s; then writes out and lse.
template <typename T>
VLMFAST_INLINE void merge_splits(const Plan& p, const ForwardArgs& a, const ForwardSchedule& sch,
                                 int64_t task, Scratch& w, const float* partial) {
  const int64_t rb = task % p.row_blocks, pair = task / p.row_blocks;
  const int64_t b = pair / p.s.kv_heads, kv_head = pair % p.s.kv_heads;
  const int64_t first = rb * p.block_rows;
  RowBlock r;
  describe_rows(p, a.bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
  float* m = w.stats.get(2 * kMaxRowBlock);
  float* l = m + kMaxRowBlock;
  float* acc = w.acc.get(kMaxRowBlock * p.width);
  std::fill(acc, acc + r.count * p.width, 0.0f);
  for (int64_t i = 0; i < r.count; ++i) {
    float top = -kInf;
    for (int64_t sp = 0; sp < sch.splits; ++sp)
      top = std::max(top, partial[(task * sch.splits + sp) * sch.slot + i]);
    m[i] = top;
    l[i] = 0.0f;
    if (top == -kInf) continue;
    for (int64_t sp = 0; sp < sch.splits; ++sp) {
      const float* part = partial + (task * sch.splits + sp) * sch.slot;
      const float weight = std::exp2(part[i] - top);
      l[i] += weight * part[p.block_rows + i];
      const float* pacc = part + 2 * p.block_rows + i * p.width;
      for (int64_t e = 0; e < p.width; ++e) acc[i * p.width + e] += weight * pacc[e];
    }
  }
  finish_rows<T>(p, a, b, r, m, l, acc);
}

// ----------------------------------------------------------------------------------------------
// Backward.

struct BackwardArgs {
  AttentionInput dout, q, k, v, out;
  const float* lse;
  AttentionBias bias;
  AttentionOutput dq, dk, dv;
  const float* delta;  // D = rowsum(dO * O), (B, H, L)
};

// Floats of one packed backward row block: [q | dO | lse2 | D].
int64_t backward_row_tile(const Plan& p) { return 2 * p.block_rows * (p.width + 1); }

// A row block's lse (base 2; +inf for an empty row so that its probabilities are 2^-inf = 0)
// and D.
VLMFAST_INLINE void pack_row_stats(const Plan& p, const BackwardArgs& a, int64_t b, const RowBlock& r,
                                   float* lse2, float* delta) {
  for (int64_t i = 0; i < r.count; ++i) {
    const int64_t at = (b * p.s.heads + r.head[i]) * p.s.q_len + r.pos[i];
    lse2[i] = a.lse[at] == -kInf ? kInf : a.lse[at] * kLog2e;
    delta[i] = a.delta[at];
  }
}

// Packs a row block's q (scaled to base 2), dO, lse2 and D.
template <typename T>
VLMFAST_INLINE void pack_backward_rows(const Plan& p, const BackwardArgs& a, int64_t b,
                                       const RowBlock& r, float* q, float* dout, float* lse2,
                                       float* delta) {
  pack_query_rows<T>(a.q, p, b, r, p.q_mult, q, /*rotate=*/true);
  pack_query_rows<T>(a.dout, p, b, r, 1.0f, dout);
  pack_row_stats(p, a, b, r, lse2, delta);
}

// Recomputes one (row block, key block) tile: leaves P in s and dS in ds; false (and nothing
// computed) when no key of the tile takes part, so that P = dS = 0.
VLMFAST_INLINE bool backward_tile(const Plan& p, const AttentionBias& bias, const RowBlock& r,
                                  int64_t first_key, int64_t keys, const float* q,
                                  const float* dout, const float* lse2, const float* delta,
                                  const float* kt, const float* vt, float* s, float* ds) {
  tile_scores(q, p.width, kt, p.s.head_dim, s, r.count);  // s = q k^T (scaled, base 2)
  mask_scores(p, bias, r, first_key, keys, s);
  if (!tile_has_keys(s, r.count)) return false;
  tile_probabilities(s, lse2, r.count);                   // P = 2^(s - lse2)
  tile_scores(dout, p.width, vt, p.s.head_dim, ds, r.count);  // dP = dO v^T
  tile_score_grads(s, ds, delta, r.count);                 // dS = P (dP - D)
  return true;
}

// Calls visit(rb, first) for each row block of (b, kv_head) that can see the keys from
// first_key on, with r describing it: all, or when causal the blocks from the first one whose
// rows reach position first_key.
template <typename Visit>
VLMFAST_INLINE void row_blocks_seeing(const Plan& p, const AttentionBias& bias, int64_t b,
                                      int64_t kv_head, int64_t first_key, RowBlock& r, Visit&& visit) {
  const int64_t first_block = p.s.causal ? std::min(p.rows, first_key * p.group) / p.block_rows : 0;
  for (int64_t rb = first_block; rb < p.row_blocks; ++rb) {
    const int64_t first = rb * p.block_rows;
    describe_rows(p, bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
    visit(rb, first);
  }
}

// Writes a key block's dk (times dk_scale, rotated back where the plan rotates k) and dv.
template <typename T>
VLMFAST_INLINE void store_key_grads(const Plan& p, const BackwardArgs& a, int64_t b, int64_t kv_head,
                                    int64_t first_key, int64_t keys, float* dk, const float* dv,
                                    float dk_scale) {
  const int64_t width = p.width;
  for (int64_t j = 0; j < keys; ++j) {
    T* dk_row = row_of<T>(a.dk, b, kv_head, first_key + j);
    T* dv_row = row_of<T>(a.dv, b, kv_head, first_key + j);
    // dk is in the rotated space: back through the (orthogonal) rotation's transpose.
    if (p.s.rotary_half > 0) rotate_row(p, first_key + j, dk + j * width, -1.0f);
    for (int64_t e = 0; e < p.s.head_dim; ++e) {
      dk_row[e] = from_float<T>(dk[j * width + e] * dk_scale);
      dv_row[e] = from_float<T>(dv[j * width + e]);
    }
  }
}

#if VLMFAST_GEMM_X86
// ----------------------------------------------------------------------------------------------
// The backward's pair path (forward_rows_pairs' conditions): the five products of a tile on
// vdpbf16ps, P and dS rounded to bfloat16 pairs as each product needs them.

// A row block packed for the pair path, in backward_row_tile(p) floats: q and dO as bfloat16 rows
// (the scores), q and dO as pairs of rows (the sums over rows into dk, dv), lse2, D. q is not
// scaled: the scores take q_mult, dk the scale.
struct PairRows {
  uint32_t *q, *dout, *q_pairs, *dout_pairs;
  float *lse2, *delta;

  PairRows(const Plan& p, float* tile) {
    const int64_t part = p.block_rows * p.width / 2;  // floats of each of the four tiles
    q = reinterpret_cast<uint32_t*>(tile);
    dout = q + part;
    q_pairs = dout + part;
    dout_pairs = q_pairs + part;
    lse2 = tile + 4 * part;
    delta = lse2 + p.block_rows;
  }
  void pack(const Plan& p, const BackwardArgs& a, int64_t b, const RowBlock& r) const {
    pack_query_pairs(a.q, p, b, r, reinterpret_cast<uint16_t*>(q), /*rotate=*/true);
    pack_query_pairs(a.dout, p, b, r, reinterpret_cast<uint16_t*>(dout));
    pair_packed_rows(reinterpret_cast<const uint16_t*>(q), r.count, p, q_pairs);
    pair_packed_rows(reinterpret_cast<const uint16_t*>(dout), r.count, p, dout_pairs);
    pack_row_stats(p, a, b, r, lse2, delta);
  }
};

// The key block's tiles: K and V as pairs of the head dim (scores, dP), K as pairs of keys (dS K).
struct PairKeys {
  uint32_t *k_dims, *v_dims, *k_rows;
  uint16_t* rotated;  // the key block rotated, where the plan has rotary tables

  PairKeys(const Plan& p, Scratch& w)
      : k_dims(reinterpret_cast<uint32_t*>(w.kt.get(p.width * kKeyBlock))),
        v_dims(reinterpret_cast<uint32_t*>(w.vt.get(p.width * kKeyBlock))),
        k_rows(reinterpret_cast<uint32_t*>(w.krows.get(kKeyBlock * p.width))),
        rotated(rotated_key_buffer(p, w)) {}
  void pack(const Plan& p, const BackwardArgs& a, int64_t b, int64_t kv_head, int64_t first_key,
            int64_t keys, bool with_k_rows) {
    int64_t stride = 0;
    const BFloat16* k = key_block_rows(p, a.k, b, kv_head, first_key, keys, rotated, stride);
    pack_dim_pairs(k, stride, keys, p, k_dims);
    pack_dim_pairs(row_of<BFloat16>(a.v, b, kv_head, first_key), a.v.strides[2], keys, p, v_dims);
    if (with_k_rows) pack_row_pairs(k, stride, keys, p, k_rows);
  }
};

// backward_tile on pairs: P in s, dS in ds (all 64 columns: the tiles are zero past the keys).
VLMFAST_INLINE bool backward_tile_pairs(const Plan& p, const AttentionBias& bias, const RowBlock& r,
                                        int64_t first_key, int64_t keys, const PairRows& rows,
                                        const PairKeys& tiles, float* s, float* ds) {
  namespace ap = attention_pairs;
  const int64_t pairs = p.width / 2;
  ap::tile_scores(rows.q, pairs, tiles.k_dims, pairs, p.q_mult, s, r.count, kKeyBlock);
  mask_scores(p, bias, r, first_key, keys, s);
  if (!tile_has_keys(s, r.count)) return false;
  tile_probabilities(s, rows.lse2, r.count);                                 // P
  ap::tile_scores(rows.dout, pairs, tiles.v_dims, pairs, 1.0f, ds, r.count, kKeyBlock);  // dP
  tile_score_grads(s, ds, rows.delta, r.count);                              // dS
  return true;
}

// dS of a tile as pairs of keys, then dq_i += sum_j dS_ij k_j.
VLMFAST_INLINE void add_dq_pairs(const Plan& p, const RowBlock& r, int64_t keys, const float* ds,
                                 const PairKeys& tiles, uint32_t* scratch, float* dq) {
  attention_pairs::round_pairs_along_keys(ds, r.count, scratch);
  attention_pairs::tile_accumulate(scratch, kKeyBlock / 2, 1, tiles.k_rows, p.width, (keys + 1) / 2, dq,
                                   p.width, r.count, p.width);
}

// backward_key_block on pairs.
VLMFAST_INLINE void backward_key_block_pairs(const Plan& p, const BackwardArgs& a, int64_t b,
                                             int64_t kv_head, int64_t kb, Scratch& w, float* dq_acc) {
  namespace ap = attention_pairs;
  const int64_t width = p.width;
  const int64_t first_key = kb * kKeyBlock;
  const int64_t keys = std::min(kKeyBlock, p.s.kv_len - first_key);
  PairKeys tiles(p, w);
  tiles.pack(p, a, b, kv_head, first_key, keys, dq_acc != nullptr);
  float* s = w.scores.get(kMaxRowBlock * kKeyBlock);
  float* ds = w.dscores.get(kMaxRowBlock * kKeyBlock);
  float* dk = w.dk.get(kKeyBlock * width);
  float* dv = w.dv.get(kKeyBlock * width);
  auto* rounded = reinterpret_cast<uint32_t*>(w.probs.get(3 * kMaxRowBlock * kKeyBlock / 2));
  uint32_t* p_pairs = rounded;                                  // P^T: pairs of rows per key
  uint32_t* ds_pairs = rounded + kMaxRowBlock * kKeyBlock / 2;  // dS^T likewise
  uint32_t* ds_keys = ds_pairs + kMaxRowBlock * kKeyBlock / 2;  // dS: pairs of keys per row
  std::fill(dk, dk + keys * width, 0.0f);
  std::fill(dv, dv + keys * width, 0.0f);
  RowBlock r;
  row_blocks_seeing(p, a.bias, b, kv_head, first_key, r, [&](int64_t rb, int64_t first) VLMFAST_PACKER {
    const PairRows rows(p, w.rows.get(rb, [&](float* t) VLMFAST_PACKER { PairRows(p, t).pack(p, a, b, r); }));
    if (!backward_tile_pairs(p, a.bias, r, first_key, keys, rows, tiles, s, ds)) return;
    const int64_t row_pairs = (r.count + 1) / 2;
    // dv_j += sum_i P_ij dO_i ; dk_j += sum_i dS_ij q_i (q unscaled here)
    ap::round_pairs_along_rows(s, r.count, p_pairs);
    ap::tile_accumulate(p_pairs, 1, kKeyBlock, rows.dout_pairs, width, row_pairs, dv, width, keys, width);
    ap::round_pairs_along_rows(ds, r.count, ds_pairs);
    ap::tile_accumulate(ds_pairs, 1, kKeyBlock, rows.q_pairs, width, row_pairs, dk, width, keys, width);
    if (dq_acc) add_dq_pairs(p, r, keys, ds, tiles, ds_keys, dq_acc + first * width);
  });
  store_key_grads<BFloat16>(p, a, b, kv_head, first_key, keys, dk, dv, p.s.scale);
}

// backward_query_block on pairs.
VLMFAST_INLINE void backward_query_block_pairs(const Plan& p, const BackwardArgs& a, int64_t b,
                                               int64_t kv_head, int64_t rb, Scratch& w) {
  const int64_t width = p.width;
  PairKeys tiles(p, w);
  float* s = w.scores.get(kMaxRowBlock * kKeyBlock);
  float* ds = w.dscores.get(kMaxRowBlock * kKeyBlock);
  float* dq = w.acc.get(kMaxRowBlock * width);
  auto* ds_keys = reinterpret_cast<uint32_t*>(w.probs.get(kMaxRowBlock * kKeyBlock / 2));
  const PairRows rows(p, w.pair_rows.get(backward_row_tile(p)));
  RowBlock r;
  const int64_t first = rb * p.block_rows;
  describe_rows(p, a.bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
  rows.pack(p, a, b, r);
  std::fill(dq, dq + r.count * width, 0.0f);
  const int64_t kb_end = visible_key_blocks(p, r);
  for (int64_t kb = 0; kb < kb_end; ++kb) {
    const int64_t first_key = kb * kKeyBlock;
    const int64_t keys = std::min(kKeyBlock, p.s.kv_len - first_key);
    tiles.pack(p, a, b, kv_head, first_key, keys, true);
    if (backward_tile_pairs(p, a.bias, r, first_key, keys, rows, tiles, s, ds))
      add_dq_pairs(p, r, keys, ds, tiles, ds_keys, dq);
  }
  store_query_rows<BFloat16>(a.dq, p, b, r, dq, p.s.scale, /*unrotate=*/true);
}
#endif

// dk, dv of one key block, from every query row of its (batch, kv head) that can see it; with
// dq_acc (rows, width) also adds dS k to the query rows' dq.
template <typename T>
VLMFAST_INLINE void backward_key_block(const Plan& p, const BackwardArgs& a, int64_t b,
                                       int64_t kv_head, int64_t kb, Scratch& w, float* dq_acc) {
#if VLMFAST_GEMM_X86
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (p.pair_dots) return backward_key_block_pairs(p, a, b, kv_head, kb, w, dq_acc);
  }
#endif
  const int64_t width = p.width;
  const int64_t first_key = kb * kKeyBlock;
  const int64_t keys = std::min(kKeyBlock, p.s.kv_len - first_key);
  float* kt = w.kt.get(width * kKeyBlock);
  float* vt = w.vt.get(width * kKeyBlock);
  float* s = w.scores.get(kMaxRowBlock * kKeyBlock);
  float* ds = w.dscores.get(kMaxRowBlock * kKeyBlock);
  float* dk = w.dk.get(kKeyBlock * width);
  float* dv = w.dv.get(kKeyBlock * width);
  const int64_t rows_tile = p.block_rows * width;  // see backward_row_tile
  const T* k_rows = row_of<T>(a.k, b, kv_head, first_key);
  int64_t ldk = 0;
  const float* k = pack_keys(k_rows, a.k.strides[2], keys, first_key, p, dq_acc != nullptr, kt,
                             w.krows.get(kKeyBlock * width), ldk);
  pack_transposed(row_of<T>(a.v, b, kv_head, first_key), a.v.strides[2], keys, p, vt);
  std::fill(dk, dk + keys * width, 0.0f);
  std::fill(dv, dv + keys * width, 0.0f);

  RowBlock r;
  row_blocks_seeing(p, a.bias, b, kv_head, first_key, r, [&](int64_t rb, int64_t first) VLMFAST_PACKER {
    // [q | dO | lse2 | D] of the row block, packed once per job (w.rows, see backward_impl).
    const float* q = w.rows.get(rb, [&](float* t) VLMFAST_PACKER {
      pack_backward_rows<T>(p, a, b, r, t, t + rows_tile, t + 2 * rows_tile,
                            t + 2 * rows_tile + p.block_rows);
    });
    const float* dout = q + rows_tile;
    const float* lse2 = q + 2 * rows_tile;
    const float* delta = lse2 + p.block_rows;
    if (!backward_tile(p, a.bias, r, first_key, keys, q, dout, lse2, delta, kt, vt, s, ds)) return;
    // dv_j += sum_i P_ij dO_i ; dk_j += sum_i dS_ij q_i (q here carries scale * log2 e)
    tile_accumulate(s, 1, kKeyBlock, dout, width, r.count, dv, width, keys, width);
    tile_accumulate(ds, 1, kKeyBlock, q, width, r.count, dk, width, keys, width);
    // dq_i += sum_j dS_ij k_j (times scale when written)
    if (dq_acc)
      tile_accumulate(ds, kKeyBlock, 1, k, ldk, keys, dq_acc + first * width, width, r.count,
                      width);
  });
  store_key_grads<T>(p, a, b, kv_head, first_key, keys, dk, dv, kLn2);  // undo q's log2(e)
}

// dq of one row block: dq_i = scale * sum_j dS_ij k_j over the key blocks it sees.
template <typename T>
VLMFAST_INLINE void backward_query_block(const Plan& p, const BackwardArgs& a, int64_t b,
                                         int64_t kv_head, int64_t rb, Scratch& w) {
#if VLMFAST_GEMM_X86
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (p.pair_dots) return backward_query_block_pairs(p, a, b, kv_head, rb, w);
  }
#endif
  const int64_t width = p.width;
  float* kt = w.kt.get(width * kKeyBlock);
  float* vt = w.vt.get(width * kKeyBlock);
  float* kbuf = w.krows.get(kKeyBlock * width);
  float* q = w.q.get(kMaxRowBlock * width);
  float* dout = w.dout.get(kMaxRowBlock * width);
  float* s = w.scores.get(kMaxRowBlock * kKeyBlock);
  float* ds = w.dscores.get(kMaxRowBlock * kKeyBlock);
  float* dq = w.acc.get(kMaxRowBlock * width);
  float* lse2 = w.stats.get(2 * kMaxRowBlock);
  float* delta = lse2 + kMaxRowBlock;
  RowBlock r;
  const int64_t first = rb * p.block_rows;
  describe_rows(p, a.bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
  pack_backward_rows<T>(p, a, b, r, q, dout, lse2, delta);
  std::fill(dq, dq + r.count * width, 0.0f);
  const int64_t kb_end = visible_key_blocks(p, r);
  for (int64_t kb = 0; kb < kb_end; ++kb) {
    const int64_t first_key = kb * kKeyBlock;
    const int64_t keys = std::min(kKeyBlock, p.s.kv_len - first_key);
    const T* k_rows = row_of<T>(a.k, b, kv_head, first_key);
    int64_t ldk;
    const float* k = pack_keys(k_rows, a.k.strides[2], keys, first_key, p, true, kt, kbuf, ldk);
    pack_transposed(row_of<T>(a.v, b, kv_head, first_key), a.v.strides[2], keys, p, vt);
    if (backward_tile(p, a.bias, r, first_key, keys, q, dout, lse2, delta, kt, vt, s, ds))
      tile_accumulate(ds, kKeyBlock, 1, k, ldk, keys, dq, width, r.count, width);
  }
  store_query_rows<T>(a.dq, p, b, r, dq, p.s.scale, /*unrotate=*/true);
}

// D_i = rowsum(dO_i * O_i) for the (B * H * L) query rows [first, first + count).
template <typename T>
VLMFAST_INLINE void delta_rows(const Plan& p, const BackwardArgs& a, int64_t first, int64_t count,
                               float* delta) {
  for (int64_t row = first; row < first + count; ++row) {
    const int64_t pos = row % p.s.q_len, bh = row / p.s.q_len;
    const T* o = row_of<T>(a.out, bh / p.s.heads, bh % p.s.heads, pos);
    const T* g = row_of<T>(a.dout, bh / p.s.heads, bh % p.s.heads, pos);
    float sum = 0.0f;
    for (int64_t e = 0; e < p.s.head_dim; ++e) sum += to_float(o[e]) * to_float(g[e]);
    delta[row] = sum;
  }
}

// Fused backward of one (batch, kv head): every key block's dk, dv, and dq accumulated in a
// thread-local buffer that this job alone writes.
template <typename T>
VLMFAST_INLINE void backward_pair(const Plan& p, const BackwardArgs& a, int64_t pair,
                                  bool keep_rows, Scratch& w) {
  const int64_t b = pair / p.s.kv_heads, kv_head = pair % p.s.kv_heads;
  float* dq = w.dq.get(p.rows * p.width);
  std::fill(dq, dq + p.rows * p.width, 0.0f);
  w.rows.reset(p.row_blocks, backward_row_tile(p), keep_rows);
  for (int64_t kb = 0; kb < p.key_blocks; ++kb) backward_key_block<T>(p, a, b, kv_head, kb, w, dq);
  RowBlock r;
  for (int64_t first = 0; first < p.rows; first += p.block_rows) {
    describe_rows(p, a.bias, b, kv_head, first, std::min(p.block_rows, p.rows - first), r);
    store_query_rows<T>(a.dq, p, b, r, dq + first * p.width, p.s.scale, /*unrotate=*/true);
  }
}

// First pass of the two-pass backward: dk, dv of one (batch, kv head, key block).
template <typename T>
VLMFAST_INLINE void backward_keys_only(const Plan& p, const BackwardArgs& a, int64_t job,
                                       Scratch& w) {
  const int64_t pair = job / p.key_blocks, kb = job % p.key_blocks;
  w.rows.reset(p.row_blocks, backward_row_tile(p), false);
  backward_key_block<T>(p, a, pair / p.s.kv_heads, pair % p.s.kv_heads, kb, w, nullptr);
}

// Second pass: dq of one (batch, kv head, row block).
template <typename T>
VLMFAST_INLINE void backward_queries_only(const Plan& p, const BackwardArgs& a, int64_t job,
                                          Scratch& w) {
  const int64_t pair = job / p.row_blocks, rb = job % p.row_blocks;
  backward_query_block<T>(p, a, pair / p.s.kv_heads, pair % p.s.kv_heads, rb, w);
}

// ----------------------------------------------------------------------------------------------
// Jobs, one multi-versioned function per element type and kind of job. OpenMP outlines each
// parallel region into a function of its own that target_clones does not reach, so the regions
// below only hand out jobs and every job runs in a function compiled for AVX-512 / AVX2.

#define VLMFAST_ATTENTION_JOBS(T, SUFFIX)                                                       \
  VLMFAST_MULTIVERSION void forward_job_##SUFFIX(const Plan& p, const ForwardArgs& a,            \
                                                 const ForwardSchedule& sch, int64_t job,        \
                                                 Scratch& w, float* partial) {                   \
    forward_job<T>(p, a, sch, job, w, partial);                                                 \
  }                                                                                             \
  VLMFAST_MULTIVERSION void merge_splits_##SUFFIX(const Plan& p, const ForwardArgs& a,           \
                                                  const ForwardSchedule& sch, int64_t task,      \
                                                  Scratch& w, const float* partial) {            \
    merge_splits<T>(p, a, sch, task, w, partial);                                               \
  }                                                                                             \
  VLMFAST_MULTIVERSION void delta_rows_##SUFFIX(const Plan& p, const BackwardArgs& a,            \
                                                int64_t first, int64_t count, float* delta) {    \
    delta_rows<T>(p, a, first, count, delta);                                                   \
  }                                                                                             \
  VLMFAST_MULTIVERSION void backward_pair_##SUFFIX(const Plan& p, const BackwardArgs& a,         \
                                                   int64_t pair, bool keep_rows, Scratch& w) {   \
    backward_pair<T>(p, a, pair, keep_rows, w);                                                 \
  }                                                                                             \
  VLMFAST_MULTIVERSION void backward_keys_only_##SUFFIX(const Plan& p, const BackwardArgs& a,    \
                                                        int64_t job, Scratch& w) {               \
    backward_keys_only<T>(p, a, job, w);                                                        \
  }                                                                                             \
  VLMFAST_MULTIVERSION void backward_queries_only_##SUFFIX(const Plan& p, const BackwardArgs& a, \
                                                           int64_t job, Scratch& w) {            \
    backward_queries_only<T>(p, a, job, w);                                                     \
  }                                                                                             \
  template <>                                                                                   \
  struct Jobs<T> {                                                                              \
    static void forward(const Plan& p, const ForwardArgs& a, const ForwardSchedule& sch,        \
                        int64_t job, Scratch& w, float* partial) {                              \
      forward_job_##SUFFIX(p, a, sch, job, w, partial);                                         \
    }                                                                                           \
    static void merge(const Plan& p, const ForwardArgs& a, const ForwardSchedule& sch,          \
                      int64_t task, Scratch& w, const float* partial) {                         \
      merge_splits_##SUFFIX(p, a, sch, task, w, partial);                                       \
    }                                                                                           \
    static void delta(const Plan& p, const BackwardArgs& a, int64_t first, int64_t count,       \
                      float* delta) {                                                           \
      delta_rows_##SUFFIX(p, a, first, count, delta);                                           \
    }                                                                                           \
    static void pair(const Plan& p, const BackwardArgs& a, int64_t pair, bool keep, Scratch& w) { \
      backward_pair_##SUFFIX(p, a, pair, keep, w);                                              \
    }                                                                                           \
    static void keys(const Plan& p, const BackwardArgs& a, int64_t job, Scratch& w) {           \
      backward_keys_only_##SUFFIX(p, a, job, w);                                                \
    }                                                                                           \
    static void queries(const Plan& p, const BackwardArgs& a, int64_t job, Scratch& w) {        \
      backward_queries_only_##SUFFIX(p, a, job, w);                                             \
    }                                                                                           \
  };

template <typename T>
struct Jobs;

VLMFAST_ATTENTION_JOBS(float, f32)
VLMFAST_ATTENTION_JOBS(Half, f16)
VLMFAST_ATTENTION_JOBS(BFloat16, bf16)

// Runs run(Scratch&) on `threads` threads (its `omp for` loops share their jobs out), each with a
// Scratch: without kept tiles a job's scratch is a few tiles whatever S is, so each thread keeps
// one across calls (allocating it every decode step showed); kept tiles grow with S (keep): a
// fresh one per call. One thread starts no team: the loops then run on the caller alone.
template <typename Run>
void run_with_scratch(bool keep, int threads, const Run& run) {
  auto scratch_and_run = [&] {
    if (keep) {
      Scratch w;
      run(w);
    } else {
      static thread_local Scratch w;
      run(w);
    }
  };
  if (threads == 1) {
    scratch_and_run();
    return;
  }
#pragma omp parallel num_threads(threads)
  scratch_and_run();
}

template <typename T>
void forward_impl(const AttentionShape& shape, const ForwardArgs& a, int threads) {
  const Plan p = plan_for<T>(shape, threads);
  const ForwardSchedule sch(p, threads);
  if (sch.tasks == 0) return;
  const int64_t partial_floats = sch.splits > 1 ? sch.tasks * sch.splits * sch.slot : 0;
  std::vector<float> partial(static_cast<size_t>(partial_floats));
  auto run = [&](Scratch& w) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < sch.jobs; ++job)
      Jobs<T>::forward(p, a, sch, job, w, partial.data());
    if (sch.splits > 1) {
#pragma omp for schedule(static)
      for (int64_t task = 0; task < sch.tasks; ++task)
        Jobs<T>::merge(p, a, sch, task, w, partial.data());
    }
  };
  run_with_scratch(sch.keep, threads, run);
}

// Packed sequences (varlen): every segment is a dense problem of batch 1 whose tensors, rotary
// rows and lse start at its first token; the jobs of all segments run in one parallel loop.
// One call replaces a launch per segment: Qwen2.5-VL's window blocks have ~30 segments of <= 64
// tokens, each a few microseconds of kernel work against the launch, allocation and copy-back
// of a per-segment call.
template <typename T>
void varlen_forward_impl(const AttentionShape& shape, const int32_t* cu_seqlens,
                         int64_t sequences, const ForwardArgs& packed, int threads) {
  struct Segment {
    Plan plan;
    ForwardSchedule schedule;
    ForwardArgs args;
  };
  auto at = [](auto t, int64_t rows) {  // the tensor t from packed row `rows` on
    t.data = static_cast<std::conditional_t<std::is_same_v<decltype(t), AttentionInput>,
                                            const T*, T*>>(t.data) + rows * t.strides[2];
    return t;
  };
  std::vector<Segment> segments;
  std::vector<int64_t> first_job{0};  // segment i owns jobs [first_job[i], first_job[i + 1])
  bool keep = false;
  for (int64_t i = 0; i < sequences; ++i) {
    const int64_t start = cu_seqlens[i], length = cu_seqlens[i + 1] - start;
    if (length <= 0) continue;
    AttentionShape s = shape;
    s.batch = 1;
    s.q_len = s.kv_len = length;
    if (s.rotary_half > 0) {
      s.rotary_cos += start * s.rotary_stride;
      s.rotary_sin += start * s.rotary_stride;
    }
    const Plan plan = plan_for<T>(s, threads);
    const ForwardSchedule schedule(plan, threads, /*allow_splits=*/false);
    const ForwardArgs args{at(packed.q, start), at(packed.k, start), at(packed.v, start),
                           packed.bias, at(packed.out, start),
                           packed.lse ? packed.lse + start : nullptr, packed.lse_head_stride};
    segments.push_back({plan, schedule, args});
    first_job.push_back(first_job.back() + schedule.jobs);
    keep = keep || schedule.keep;
  }
  const int64_t jobs = first_job.back();
  if (jobs == 0) return;
  auto run = [&](Scratch& w) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < jobs; ++job) {
      const auto i = std::upper_bound(first_job.begin(), first_job.end(), job) - first_job.begin() - 1;
      const Segment& seg = segments[static_cast<size_t>(i)];
      Jobs<T>::forward(seg.plan, seg.args, seg.schedule, job - first_job[static_cast<size_t>(i)], w,
                       nullptr);
    }
  };
  run_with_scratch(keep, threads, run);
}

template <typename T>
void backward_impl(const AttentionShape& shape, BackwardArgs a, int threads,
                   AttentionBackwardStrategy strategy) {
  const Plan p = plan_for<T>(shape, threads);
  const int64_t pairs = shape.batch * shape.kv_heads;
  if (pairs == 0) return;
  const int64_t query_rows = shape.batch * shape.heads * shape.q_len;
  std::vector<float> delta(static_cast<size_t>(query_rows));
  a.delta = delta.data();
  // Fused: one job per (batch, kv head) owns all of its dq rows, so dq accumulates in a
  // thread-local buffer with no second pass; it needs enough pairs to balance the threads.
  if (strategy == AttentionBackwardStrategy::Auto)
    strategy = pairs >= 4 * threads && worth_keeping(p.rows * p.width)
                   ? AttentionBackwardStrategy::Fused
                   : AttentionBackwardStrategy::TwoPass;
  const bool keep_rows = worth_keeping(p.row_blocks * backward_row_tile(p));
  constexpr int64_t kDeltaRows = 256;
#pragma omp parallel num_threads(threads)
  {
    Scratch w;
#pragma omp for schedule(static)
    for (int64_t first = 0; first < query_rows; first += kDeltaRows)
      Jobs<T>::delta(p, a, first, std::min(kDeltaRows, query_rows - first), delta.data());
    // (the implicit barrier: every D is ready)
    if (strategy == AttentionBackwardStrategy::Fused) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t pair = 0; pair < pairs; ++pair) Jobs<T>::pair(p, a, pair, keep_rows, w);
    } else {
      // dk, dv per (batch, kv head, key block); then dq per (batch, kv head, row block).
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < pairs * p.key_blocks; ++job) Jobs<T>::keys(p, a, job, w);
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < pairs * p.row_blocks; ++job) Jobs<T>::queries(p, a, job, w);
    }
  }
}

void check_shape(const AttentionShape& s) {
  if (s.batch < 0 || s.heads < 0 || s.q_len < 0 || s.kv_len < 0 || s.head_dim < 1 ||
      s.kv_heads < 1 || s.heads % s.kv_heads != 0)
    throw std::invalid_argument("vlmfast attention: invalid sizes (need E >= 1, H % Hkv == 0)");
  if (s.rotary_half < 0 || 2 * s.rotary_half > s.head_dim ||
      (s.rotary_half > 0 && (s.rotary_cos == nullptr || s.rotary_sin == nullptr)))
    throw std::invalid_argument("vlmfast attention: invalid rotary tables (need R/2 <= E/2)");
}

}  // namespace

void attention_forward(const AttentionShape& shape, AttentionInput q, AttentionInput k,
                       AttentionInput v, AttentionBias bias, AttentionOutput out, float* lse,
                       int dtype, int threads) {
  check_shape(shape);
  threads = resolve_threads(threads);
  // q k^T and p v: 2 B H L S E multiply-adds. Measured on a 2-core machine, a decode step over
  // 128 keys (9 heads, E = 64: 2^17) ran in 6 us on one thread, 9 us on two.
  const double work = 2.0 * shape.batch * shape.heads * shape.q_len * shape.kv_len * shape.head_dim;
  if (work < double(1 << 18)) threads = 1;
  const ForwardArgs a{q, k, v, bias, out, lse, shape.q_len};
  switch (dtype_from_tag(dtype)) {
    case DType::Float32: return forward_impl<float>(shape, a, threads);
    case DType::Float16: return forward_impl<Half>(shape, a, threads);
    case DType::BFloat16: return forward_impl<BFloat16>(shape, a, threads);
  }
}

void attention_varlen_forward(const AttentionShape& shape, const int32_t* cu_seqlens,
                              int64_t sequences, AttentionInput q, AttentionInput k,
                              AttentionInput v, AttentionOutput out, float* lse, int dtype,
                              int threads) {
  check_shape(shape);
  if (sequences < 0 || (sequences > 0 && cu_seqlens == nullptr))
    throw std::invalid_argument("vlmfast attention varlen: invalid cu_seqlens");
  threads = resolve_threads(threads);
  double work = 0.0;  // as attention_forward: one thread below 2^18 multiply-adds in all
  for (int64_t i = 0; i < sequences; ++i) {
    const double length = double(cu_seqlens[i + 1]) - double(cu_seqlens[i]);
    work += 2.0 * shape.heads * length * length * shape.head_dim;
  }
  if (work < double(1 << 18)) threads = 1;
  // packed tensors: strides[0] unused (batch 1 per segment), strides[2] between tokens
  const ForwardArgs a{q, k, v, AttentionBias{nullptr, {0, 0, 0, 0}}, out, lse, shape.q_len};
  switch (dtype_from_tag(dtype)) {
    case DType::Float32: return varlen_forward_impl<float>(shape, cu_seqlens, sequences, a, threads);
    case DType::Float16: return varlen_forward_impl<Half>(shape, cu_seqlens, sequences, a, threads);
    case DType::BFloat16:
      return varlen_forward_impl<BFloat16>(shape, cu_seqlens, sequences, a, threads);
  }
}

void attention_backward(const AttentionShape& shape, AttentionInput grad_out, AttentionInput q,
                        AttentionInput k, AttentionInput v, AttentionInput out, const float* lse,
                        AttentionBias bias, AttentionOutput dq, AttentionOutput dk,
                        AttentionOutput dv, int dtype, int threads, int strategy) {
  check_shape(shape);
  if (strategy < 0 || strategy > 2)
    throw std::invalid_argument("vlmfast attention: unknown backward strategy " +
                                std::to_string(strategy));
  threads = resolve_threads(threads);
  const BackwardArgs a{grad_out, q, k, v, out, lse, bias, dq, dk, dv, nullptr};
  const auto how = static_cast<AttentionBackwardStrategy>(strategy);
  switch (dtype_from_tag(dtype)) {
    case DType::Float32: return backward_impl<float>(shape, a, threads, how);
    case DType::Float16: return backward_impl<Half>(shape, a, threads, how);
    case DType::BFloat16: return backward_impl<BFloat16>(shape, a, threads, how);
  }
}

}  // namespace vlmfast::cpu
