#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/cpu_info.h"
#include "cpu/gemm_activation.h"
#include "cpu/gemm_elements.h"
#include "cpu/gemm_kernels.h"
#include "cpu/gemm_pack.h"

namespace vlmfast::cpu {
namespace {

namespace gk = gemm_kernels;
namespace gp = gemm_pack;
using gk::NR;

// ---------------------------------------------------------------------------- the level

const char* const kIsaNames[] = {"portable", "avx2", "avx512", "avx512_bf16", "amx"};
std::atomic<bool> g_amx_emulated{false};  // tests: the AMX level on emulated tiles

bool isa_available(GemmIsa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case GemmIsa::Portable: return true;
#if VLMFAST_GEMM_X86
    case GemmIsa::Avx2: return f.avx2_fma;
    case GemmIsa::Avx512: return f.avx512;
    case GemmIsa::Avx512Bf16: return f.avx512_bf16;
    case GemmIsa::Amx: return f.avx512_bf16 && (amx_usable() || g_amx_emulated.load());
#endif
    default: return false;
  }
}

GemmIsa best_available(int at_most) {
  for (int level = std::min(at_most, static_cast<int>(GemmIsa::Amx)); level > 0; --level)
    if (isa_available(static_cast<GemmIsa>(level))) return static_cast<GemmIsa>(level);
  return GemmIsa::Portable;
}

int isa_from_name(const char* name) {
  if (!name || !*name) return -1;
  for (int i = 0; i < 5; ++i)
    if (std::strcmp(name, kIsaNames[i]) == 0) return i;
  throw std::invalid_argument(std::string("VLMFAST_GEMM_ISA: expected one of portable, avx2, avx512, "
                                          "avx512_bf16, amx; got '") + name + "'");
}

std::atomic<int> g_isa{-1};  // the level in use once chosen
std::atomic<int64_t> g_kernel_calls[5];  // GEMMs run per kernel (indexed like kIsaNames)

// ---------------------------------------------------------------------------- blocking
//
// Goto's scheme, sized from this CPU's caches. A task owns a block of MC rows x a range of
// 32-column panels of C. Per block of KC reduction steps it packs its MC x KC slice of A
// (L2-resident) and sweeps it against each panel's KC x 32 slice of B, which stays in L1 while
// the MC / MR slivers of A stream past it from L2. So:
//   KC: the B slice (KC x 32 operands) takes half of L1d, leaving room for the A sliver and C;
//       float32 operands take all of it: C's tiles are read and written once per KC block, from
//       memory when the output outgrows L2, and halving that traffic beat keeping the slice in
//       half of L1 (single thread, Zen 4, 32 KiB L1d, KC 128 -> 256: M = 1632, K = 1280,
//       N = 5120 88-90 -> 97-103 GFLOP/s, N = 6840 75-88 -> 89-94; M = 408, 5120 x 5120
//       81-94 -> 97-102; 256 x 768 x 3072 91-98 -> 96-101; bf16 pairs gained nothing at 512);
//   MC: the A block takes half of L2.
// K above KC is split into equal blocks (partial sums accumulate in float32).
struct Blocking {
  int64_t kc, mc;
};

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  const long long x = std::atoll(v);
  return x > 0 ? x : fallback;
}

// VLMFAST_GEMM_KC / VLMFAST_GEMM_MC (read once) override the two, for experiments on a new CPU.
template <typename Layout>
Blocking compute_blocking() {
  const CacheSizes& c = cache_sizes();
  constexpr int64_t elem = sizeof(typename Layout::Operand), step = Layout::K_STEP;
  constexpr int64_t grain = step > 8 ? step : 8;
  const int64_t l1_share = elem == 4 ? c.l1d : c.l1d / 2;  // see above
  int64_t kc = env_int("VLMFAST_GEMM_KC", l1_share / (NR * elem));
  kc = std::max<int64_t>(grain, kc / grain * grain);
  int64_t mc = env_int("VLMFAST_GEMM_MC", c.l2 / 2 / (kc * elem));
  mc = std::clamp<int64_t>(mc / Layout::MR * Layout::MR, Layout::MR, 64 * Layout::MR);
  return {kc, mc};
}

template <typename Layout>
const Blocking& blocking_for() {
  static const Blocking blocking = compute_blocking<Layout>();
  return blocking;
}

// ---------------------------------------------------------------------------- per-thread buffers

// Grow-only, 64-byte aligned, kept by each (pooled) thread across calls: a fresh multi-MiB
// buffer per GEMM would pay a page fault per 4 KiB on first touch.
struct ThreadBuffer {
  void* data = nullptr;
  size_t bytes = 0;
  void* get(size_t need) {
    if (need > bytes) {
      std::free(data);
      bytes = (need + 4095) / 4096 * 4096;
      data = std::aligned_alloc(64, bytes);
      if (!data) {
        bytes = 0;
        throw std::bad_alloc();
      }
    }
    return data;
  }
  ~ThreadBuffer() { std::free(data); }
};

thread_local ThreadBuffer t_a_block, t_c_block, t_b_slice;

// ---------------------------------------------------------------------------- the problem

// Packs panels [p0, p1) of B (N x K) into 32-column panels of kp steps (B packing, below).
using PackBFn = void (*)(const Matrix&, int64_t N, int64_t K, int64_t kp, int64_t p0, int64_t p1, void*);

struct Problem {
  Matrix a;
  const void* b;  // packed
  int compute;    // DType tag
  const float* bias;
  int64_t M, N, K, kp;  // kp: K as packed (rounded up to the layout's step)
  Activation act;
  void* out;
  int out_dtype;
  int64_t ldo;
  void* pre;
  int64_t ldp;
  // Set for a B left unpacked (b_source, N x K; b unused): each task packs the KC x 32 slice
  // of a panel it is about to sweep into a buffer of its own, so B is read from memory once
  // per block of rows. Packing it whole first writes it back and reads it again: for a few rows
  // of A that round trip cost as much as the arithmetic. Only with one or two blocks of rows.
  Matrix b_source{};
  PackBFn pack_b_slice = nullptr;
};

int64_t element_bytes(const Matrix& m) { return m.dtype == static_cast<int>(DType::Float32) ? 4 : 2; }

// Where element (np * 32, k0) of B's source lies: the first of the slice of panel np from step k0.
const char* b_slice_source(const Problem& p, int64_t np, int64_t k0) {
  const Matrix& b = p.b_source;
  return static_cast<const char*>(b.data) + (np * NR * b.row_stride + k0 * b.col_stride) * element_bytes(b);
}

// Packs steps [k0, k0 + kb) of B's panel np into `slice` (kbp x 32; steps past kb are zero).
void pack_b_slice_of(const Problem& p, int64_t np, int64_t k0, int64_t kb, int64_t kbp, void* slice) {
  Matrix from = p.b_source;
  from.data = b_slice_source(p, np, k0);
  p.pack_b_slice(from, p.N - np * NR, kb, kbp, 0, 1, slice);
}

// Where the slice of panel np, steps [k0, k0 + kb), lies in B's source: `count` runs of `bytes`
// contiguous bytes, `stride` bytes apart (a run per column for a source contiguous along k, the
// forward's W; a run per step for one contiguous along n, the W^T of dx = dz W and the x^T of
// dW = dz^T x). count = 0: neither (strided both ways): not prefetched.
struct SliceRuns {
  const char* first;
  int64_t count, bytes, stride;
};

SliceRuns slice_runs(const Problem& p, int64_t np, int64_t k0, int64_t kb) {
  const Matrix& b = p.b_source;
  const int64_t elem = element_bytes(b);
  const int64_t cols = std::min<int64_t>(NR, p.N - np * NR);
  const char* first = b_slice_source(p, np, k0);
  if (b.col_stride == 1) return {first, cols, kb * elem, b.row_stride * elem};
  if (b.row_stride == 1) return {first, kb, cols * elem, b.col_stride * elem};
  return {first, 0, 0, 0};
}

// Requests runs [r0, r1) of a slice into L2 (not L1: the slice being swept fills it). The next
// panel's slice is requested a share per sliver while this one is swept: its runs lie a row of
// the source apart (for dx, 256 runs of 128 bytes, each in a page of its own), which no hardware
// prefetcher follows, and packing it cold waited on memory once per run (64 x 768 x 768 dx + dW:
// 1.90 ms with the weight out of cache, 1.41 ms in it; Zen 4, 2 threads).
void prefetch_runs(const SliceRuns& runs, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* run = runs.first + r * runs.stride;
    for (int64_t at = 0; at < runs.bytes; at += 64) __builtin_prefetch(run + at, 0, 2);
    __builtin_prefetch(run + runs.bytes - 1, 0, 2);  // a run that straddles one more line
  }
}

// The epilogue of one tile: z = c + bias; pre = z; out = act(z), rounded to T. c is float32
// (row stride ldc), rows x cols of it.
template <typename T>
__attribute__((always_inline)) inline void finish_tile(const Problem& p, const float* c, int64_t ldc,
                                                       int64_t m0, int64_t rows, int64_t n0,
                                                       int64_t cols) {
  namespace ge = gemm_elements;
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre);
  for (int64_t m = 0; m < rows; ++m) {
    const float* cr = c + m * ldc;
    T* o = out + (m0 + m) * p.ldo + n0;
    T* z_out = pre ? pre + (m0 + m) * p.ldp + n0 : nullptr;
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t w = std::min<int64_t>(16, cols - j);
      v16f z = w == 16 ? vload(cr + j) : ge::load_part(cr + j, w);
      if (p.bias) z += w == 16 ? vload(p.bias + n0 + j) : ge::load_part(p.bias + n0 + j, w);
      if (z_out) w == 16 ? ge::store16(z_out + j, z) : ge::store_part(z_out + j, z, w);
      if (p.act != Activation::None) z = gemm_activation::activate(z, p.act);
      w == 16 ? ge::store16(o + j, z) : ge::store_part(o + j, z, w);
    }
  }
}

using FinishFn = void (*)(const Problem&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);

#define VLMFAST_FINISH(T, NAME)                                                                \
  VLMFAST_MULTIVERSION void NAME(const Problem& p, const float* c, int64_t ldc, int64_t m0,   \
                                 int64_t rows, int64_t n0, int64_t cols) {                     \
    finish_tile<T>(p, c, ldc, m0, rows, n0, cols);                                             \
  }
VLMFAST_FINISH(float, finish_f32)
VLMFAST_FINISH(BFloat16, finish_bf16)
VLMFAST_FINISH(Half, finish_f16)
#undef VLMFAST_FINISH

FinishFn finish_for(int dtype) {
  switch (dtype_from_tag(dtype)) {
    case DType::Float32: return finish_f32;
    case DType::BFloat16: return finish_bf16;
    case DType::Float16: return finish_f16;
  }
  return finish_f32;
}

// The epilogue of problem p's tiles; null where there is none to run: a float32 output
// accumulated in place with no bias, pre-activation or activation is final as the kernel leaves
// it (the epilogue would read and rewrite every tile for nothing: the dx and dW GEMMs of every
// backward, and bias-free forwards).
FinishFn finish_of(const Problem& p) {
  const bool in_place = p.out_dtype == static_cast<int>(DType::Float32);
  if (in_place && !p.bias && !p.pre && p.act == Activation::None) return nullptr;
  return finish_for(p.out_dtype);
}

// Packs A's block through the layout for A's source dtype and the compute dtype.
template <typename Layout>
using PackAFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t,
                         typename Layout::Operand*);

template <typename Layout, typename Src, typename Compute>
VLMFAST_MULTIVERSION void pack_a_block(const Problem& p, int64_t m0, int64_t rows, int64_t k0,
                                       int64_t kb, int64_t kbp, typename Layout::Operand* dst) {
  gp::pack_a<Layout, Src, Compute>(static_cast<const Src*>(p.a.data), p.a.row_stride,
                                   p.a.col_stride, m0, rows, k0, kb, kbp, dst);
}

#if VLMFAST_GEMM_X86
// The vectorised packers of the AVX-512 kernels' slivers (row-major sources; anything else
// through the generic loops).
VLMFAST_TARGET_AVX512 void pack_a_f32_12(const Problem& p, int64_t m0, int64_t rows, int64_t k0,
                                         int64_t kb, int64_t kbp, float* dst) {
  if (p.a.col_stride == 1)
    return gp::pack_a_f32_rows12(static_cast<const float*>(p.a.data), p.a.row_stride, m0, rows, k0, kb, dst);
  gp::pack_a<gp::F32Layout<12>, float, float>(static_cast<const float*>(p.a.data), p.a.row_stride,
                                              p.a.col_stride, m0, rows, k0, kb, kbp, dst);
}

VLMFAST_TARGET_AVX512 void pack_a_bf16_pairs_12(const Problem& p, int64_t m0, int64_t rows, int64_t k0,
                                                int64_t kb, int64_t kbp, uint16_t* dst) {
  if (p.a.col_stride == 1)
    return gp::pack_a_bf16_rows12(static_cast<const uint16_t*>(p.a.data), p.a.row_stride, m0, rows, k0,
                                  kb, kbp, dst);
  if (p.a.row_stride == 1)
    return gp::pack_a_bf16_cols12(static_cast<const uint16_t*>(p.a.data), p.a.col_stride, m0, rows, k0,
                                  kb, kbp, dst);
  gp::pack_a<gp::PairLayout<12>, BFloat16, BFloat16>(static_cast<const BFloat16*>(p.a.data),
                                                     p.a.row_stride, p.a.col_stride, m0, rows, k0, kb,
                                                     kbp, dst);
}

VLMFAST_TARGET_AVX512BF16 void pack_a_f32_pairs_12(const Problem& p, int64_t m0, int64_t rows, int64_t k0,
                                                   int64_t kb, int64_t kbp, uint16_t* dst) {
  if (p.a.col_stride == 1)
    return gp::pack_a_f32_to_bf16_rows12(static_cast<const float*>(p.a.data), p.a.row_stride, m0, rows,
                                         k0, kb, kbp, dst);
  gp::pack_a<gp::PairLayout<12>, float, BFloat16>(static_cast<const float*>(p.a.data), p.a.row_stride,
                                                  p.a.col_stride, m0, rows, k0, kb, kbp, dst);
}
#endif

template <typename Layout>
PackAFn<Layout> pack_a_for(int src, int compute) {
  const DType s = dtype_from_tag(src), c = dtype_from_tag(compute);
#if VLMFAST_GEMM_X86
  if constexpr (std::is_same_v<Layout, gp::F32Layout<12>>) {
    if (s == DType::Float32 && c == DType::Float32) return pack_a_f32_12;
  }
  if constexpr (std::is_same_v<Layout, gp::PairLayout<12>>) {
    if (s == DType::BFloat16 && c == DType::BFloat16) return pack_a_bf16_pairs_12;
    if (s == DType::Float32 && c == DType::BFloat16) return pack_a_f32_pairs_12;
  }
#endif
  if (c == DType::BFloat16) {
    if (s == DType::Float32) return pack_a_block<Layout, float, BFloat16>;
    if (s == DType::BFloat16) return pack_a_block<Layout, BFloat16, BFloat16>;
  } else if constexpr (std::is_same_v<typename Layout::Operand, float>) {
    if (c == DType::Float16) {
      if (s == DType::Float32) return pack_a_block<Layout, float, Half>;
      if (s == DType::Float16) return pack_a_block<Layout, Half, Half>;
    } else {
      if (s == DType::Float32) return pack_a_block<Layout, float, float>;
      if (s == DType::BFloat16) return pack_a_block<Layout, BFloat16, float>;
      if (s == DType::Float16) return pack_a_block<Layout, Half, float>;
    }
  }
  throw std::invalid_argument("vlmfast gemm: A's dtype does not fit the compute dtype");
}

// ---------------------------------------------------------------------------- the GEMM

template <typename Kern, typename Layout>
struct Driver {
  using Op = typename Layout::Operand;
  static constexpr int MR = Layout::MR, STEP = Layout::K_STEP;

  // One task: rows [m0, m0 + rows) x column panels [np0, np1). C accumulates in float32: in
  // `out` itself for float32 outputs, else in a per-thread block (rows x the task's columns).
  __attribute__((always_inline)) static void task(const Problem& p, const Blocking& blk,
                                                  PackAFn<Layout> pack, FinishFn finish,
                                                  int64_t m0, int64_t rows, int64_t np0,
                                                  int64_t np1) {
    const int64_t k_blocks = (p.K + blk.kc - 1) / blk.kc;
    const int64_t kc = ((p.K + k_blocks - 1) / k_blocks + STEP - 1) / STEP * STEP;
    const int64_t slivers = (rows + MR - 1) / MR;
    Op* a_block = static_cast<Op*>(t_a_block.get(sizeof(Op) * slivers * MR * kc));
    const bool direct = p.out_dtype == static_cast<int>(DType::Float32);
    const int64_t width = (np1 - np0) * NR;
    float* cblock = direct ? nullptr
                           : static_cast<float*>(t_c_block.get(sizeof(float) * slivers * MR * width));
    Op* b_slice = p.pack_b_slice ? static_cast<Op*>(t_b_slice.get(sizeof(Op) * NR * kc)) : nullptr;
    alignas(64) float tile[MR * NR];
    if constexpr (requires_begin) Kern::begin();
    for (int64_t k0 = 0; k0 < p.K; k0 += kc) {
      const int64_t kb = std::min(kc, p.K - k0);
      const int64_t kbp = (kb + STEP - 1) / STEP * STEP;
      const bool first = k0 == 0, last = k0 + kb >= p.K;
      pack(p, m0, rows, k0, kb, kbp, a_block);
      for (int64_t np = np0; np < np1; ++np) {
        if (b_slice) pack_b_slice_of(p, np, k0, kb, kbp, b_slice);
        const SliceRuns next = b_slice && np + 1 < np1 ? slice_runs(p, np + 1, k0, kb) : SliceRuns{};
        const Op* b = b_slice ? b_slice : static_cast<const Op*>(p.b) + np * NR * p.kp + k0 * NR;
        const int64_t n0 = np * NR, cols = std::min<int64_t>(NR, p.N - n0);
        for (int64_t s = 0; s < slivers; ++s) {
          prefetch_runs(next, next.count * s / slivers, next.count * (s + 1) / slivers);
          const Op* a = a_block + s * MR * kbp;
          const int64_t r0 = s * MR, r = std::min<int64_t>(MR, rows - r0);
          if (!direct) {
            float* c = cblock + r0 * width + (np - np0) * NR;
            run_sliver(r, a, b, kbp, c, width, !first);
            if (last) finish(p, c, width, m0 + r0, r, n0, cols);
            continue;
          }
          float* o = static_cast<float*>(p.out) + (m0 + r0) * p.ldo + n0;
          if (cols == NR && (r == MR || kPartialRows)) {
            run_sliver(r, a, b, kbp, o, p.ldo, !first);
            if (last && finish) finish(p, o, p.ldo, m0 + r0, r, n0, cols);
          } else {  // an edge tile: through a full-size buffer
            if (!first)
              for (int64_t m = 0; m < r; ++m) std::copy(o + m * p.ldo, o + m * p.ldo + cols, tile + m * NR);
            run_sliver(r, a, b, kbp, tile, NR, !first);
            if (last && finish) {
              finish(p, tile, NR, m0 + r0, r, n0, cols);
            } else {
              for (int64_t m = 0; m < r; ++m) std::copy(tile + m * NR, tile + m * NR + cols, o + m * p.ldo);
            }
          }
        }
      }
    }
    if constexpr (requires_begin) Kern::end();
  }

  // A sliver of r rows: where the kernel has run_rows, an edge sliver (r < MR) computes its r
  // rows only (the block's other C rows are never touched); else the whole kernel, whose rows
  // past r the caller's buffer absorbs.
  __attribute__((always_inline)) static void run_sliver(int64_t r, const Op* a, const Op* b,
                                                        int64_t kb, float* c, int64_t ldc,
                                                        bool accumulate) {
    if constexpr (kPartialRows) {
      if (r < MR) {
        run_rows(r, std::make_integer_sequence<int, MR - 1>(), a, b, kb, c, ldc, accumulate);
        return;
      }
    }
    Kern::run(a, b, kb, c, ldc, accumulate);
  }
  template <int... R>
  __attribute__((always_inline)) static void run_rows(int64_t r, std::integer_sequence<int, R...>,
                                                      const Op* a, const Op* b, int64_t kb,
                                                      float* c, int64_t ldc, bool accumulate) {
    // R + 1 = 1 .. MR - 1: the one instantiation whose height is r
    (void)((r == R + 1 && (Kern::template run_rows<R + 1>(a, b, kb, c, ldc, accumulate), true)) ||
           ...);
  }

  template <typename K, typename = void>
  struct HasPartialRows : std::false_type {};
  template <typename K>
  struct HasPartialRows<K, std::void_t<decltype(&K::template run_rows<1>)>> : std::true_type {};
  static constexpr bool kPartialRows = HasPartialRows<Kern>::value;

  template <typename K, typename = void>
  struct HasBegin : std::false_type {};
  template <typename K>
  struct HasBegin<K, std::void_t<decltype(K::begin())>> : std::true_type {};
  static constexpr bool requires_begin = HasBegin<Kern>::value;
};

template <typename Layout>
using TaskFn = void (*)(const Problem&, const Blocking&, PackAFn<Layout>, FinishFn, int64_t,
                        int64_t, int64_t, int64_t);

// The task functions carry each kernel's instruction set (an OpenMP-outlined region would not
// inherit a target attribute, so the parallel loop calls them through a pointer).
#define VLMFAST_TASK(KERN, LAYOUT, ATTR, NAME)                                                  \
  ATTR void NAME(const Problem& p, const Blocking& blk, PackAFn<LAYOUT> pack, FinishFn finish,  \
                 int64_t m0, int64_t rows, int64_t np0, int64_t np1) {                          \
    Driver<KERN, LAYOUT>::task(p, blk, pack, finish, m0, rows, np0, np1);                       \
  }
VLMFAST_TASK(gk::Portable, gp::F32Layout<gk::Portable::MR>, VLMFAST_MULTIVERSION, task_portable)
#if VLMFAST_GEMM_X86
VLMFAST_TASK(gk::Avx2, gp::F32Layout<gk::Avx2::MR>, VLMFAST_TARGET_AVX2, task_avx2)
VLMFAST_TASK(gk::Avx512, gp::F32Layout<gk::Avx512::MR>, VLMFAST_TARGET_AVX512, task_avx512)
VLMFAST_TASK(gk::Avx512Bf16, gp::PairLayout<gk::Avx512Bf16::MR>, VLMFAST_TARGET_AVX512BF16,
             task_avx512_bf16)
VLMFAST_TASK(gk::Amx, gp::AmxLayout, VLMFAST_TARGET_AMX, task_amx)
VLMFAST_TASK(gk::AmxEmulated, gp::AmxLayout, , task_amx_emulated)
#endif
#undef VLMFAST_TASK

// How the output is cut into tasks: m_blocks blocks of mc rows (a multiple of MR, at most the
// cache-derived mc_max) x n_chunks chunks of per_chunk column panels, chosen by a small search.
// A task's cost, in units of one sliver's work on one panel: its slivers x (its panels + ~half a
// panel for packing its block of A) + ~half a unit per panel for reading that panel of B (every
// block of rows reads all of its panels again: from memory once B outgrows the caches) + ~one
// unit of fixed cost; the makespan under the dynamic schedule: ceil(tasks / threads) rounds of
// the largest task. Without B's term every split cost the same, and the most tasks won: for a
// prompt's 278 rows that was 8 blocks of 3 slivers, each reading all of B (278 x 1536 x 17920 in
// bf16: 0.32 TFLOP/s against 0.37 with it, 278 x 8960 x 1536 0.30 -> 0.38; float32 +13-25 %;
// Zen 4, 2 threads). Among the partitions within 3% of the least makespan, the one with the most
// tasks (up to 4 per thread) wins: a thread the OS takes away for a while is then absorbed by the
// others.
// fewest_row_blocks: only as many row blocks as the cache requires (B packed inside the tasks:
// each slice is packed once per row block).
struct Partition {
  int64_t m_blocks, mc, n_chunks, per_chunk;
};
constexpr double kPackACost = 0.5;  // packing a sliver of A, in panels of its work
constexpr double kReadBCost = 0.5;  // reading one panel of B, in slivers of its work

Partition partition(int64_t M, int64_t n_panels, int64_t MR, int64_t mc_max, int threads,
                    bool fewest_row_blocks) {
  const int64_t slivers = (M + MR - 1) / MR, max_slivers = std::max<int64_t>(1, mc_max / MR);
  const int64_t mb_min = (slivers + max_slivers - 1) / max_slivers;
  const int64_t mb_max = fewest_row_blocks ? mb_min : std::min(slivers, mb_min * 4 + 2 * threads);
  struct Candidate {
    Partition part;
    double cost;
    int64_t tasks;
  };
  Candidate found[1024];
  int count = 0;
  double least = -1.0;
  for (int64_t mb = mb_min; mb <= mb_max && count < 1024; ++mb) {
    const int64_t per_block = (slivers + mb - 1) / mb;  // slivers in the largest block
    if ((mb - 1) * per_block >= slivers) continue;      // an empty last block: same as fewer
    for (int64_t nc = 1; nc <= std::min<int64_t>(n_panels, 8 * threads) && count < 1024; ++nc) {
      const int64_t per_chunk = (n_panels + nc - 1) / nc;
      if ((nc - 1) * per_chunk >= n_panels) continue;
      const int64_t tasks = mb * nc, rounds = (tasks + threads - 1) / threads;
      const double cost = static_cast<double>(rounds) *
                          (per_block * (per_chunk + kPackACost) + kReadBCost * per_chunk + 1.0);
      found[count++] = {{mb, per_block * MR, nc, per_chunk}, cost, tasks};
      if (least < 0 || cost < least) least = cost;
    }
  }
  const Candidate* best = nullptr;
  for (int i = 0; i < count; ++i) {
    const Candidate& c = found[i];
    if (c.cost > least * (threads > 1 ? 1.03 : 1.0)) continue;
    const int64_t useful = std::min<int64_t>(c.tasks, 4 * threads);
    if (!best || useful > std::min<int64_t>(best->tasks, 4 * threads) ||
        (useful == std::min<int64_t>(best->tasks, 4 * threads) && c.cost < best->cost))
      best = &c;
  }
  return best ? best->part : Partition{1, slivers * MR, 1, n_panels};
}

template <typename Layout>
void run_tasks(const Problem& p, TaskFn<Layout> task, int threads) {
  const Blocking blk = blocking_for<Layout>();
  const PackAFn<Layout> pack = pack_a_for<Layout>(p.a.dtype, p.compute);
  const FinishFn finish = finish_of(p);
  const Partition part = partition(p.M, (p.N + NR - 1) / NR, Layout::MR, blk.mc, threads,
                                   p.pack_b_slice != nullptr);
  const int64_t n_panels = (p.N + NR - 1) / NR, tasks = part.m_blocks * part.n_chunks;
  auto run_one = [&](int64_t t) {
    const int64_t mb = t / part.n_chunks, chunk = t % part.n_chunks;
    const int64_t m0 = mb * part.mc, np0 = chunk * part.per_chunk;
    const int64_t np1 = std::min(n_panels, np0 + part.per_chunk);
    if (m0 < p.M && np0 < np1) task(p, blk, pack, finish, m0, std::min(part.mc, p.M - m0), np0, np1);
  };
  if (tasks == 1 || threads == 1) {
    for (int64_t t = 0; t < tasks; ++t) run_one(t);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t) run_one(t);
}

// ---------------------------------------------------------------------------- B packing

template <bool PAIRS, typename Src, typename Compute>
VLMFAST_MULTIVERSION void pack_b_range(const Matrix& b, int64_t N, int64_t K, int64_t kp,
                                       int64_t p0, int64_t p1, void* packed) {
  using Op = std::conditional_t<PAIRS, uint16_t, float>;
  for (int64_t p = p0; p < p1; ++p)
    gp::pack_b_panel<PAIRS, Src, Compute>(static_cast<const Src*>(b.data), b.row_stride,
                                          b.col_stride, N, K, kp, p, static_cast<Op*>(packed));
}

#if VLMFAST_GEMM_X86
// Vectorised B packers on CPUs with AVX-512 (the level in use decides: a forced lower level packs
// with the generic loops, as that CPU would): row-major sources (the forward's W) and, for the
// pair layout, step-major ones (the backward's W and x); anything else through the generic loops.
VLMFAST_TARGET_AVX512 void pack_b_f32_fast(const Matrix& b, int64_t N, int64_t K, int64_t kp,
                                           int64_t p0, int64_t p1, void* packed) {
  for (int64_t p = p0; p < p1; ++p) {
    if (b.col_stride == 1)
      gp::pack_b_f32_rows(static_cast<const float*>(b.data), b.row_stride, N, K, p, static_cast<float*>(packed));
    else
      gp::pack_b_panel<false, float, float>(static_cast<const float*>(b.data), b.row_stride, b.col_stride, N, K,
                                            kp, p, static_cast<float*>(packed));
  }
}

template <typename Src>
VLMFAST_TARGET_AVX512BF16 void pack_b_pairs_fast(const Matrix& b, int64_t N, int64_t K, int64_t kp,
                                                 int64_t p0, int64_t p1, void* packed) {
  const Src* src = static_cast<const Src*>(b.data);
  uint16_t* dst = static_cast<uint16_t*>(packed);
  for (int64_t p = p0; p < p1; ++p) {
    if constexpr (std::is_same_v<Src, uint16_t>) {
      if (b.col_stride == 1) {
        gp::pack_b_bf16_pairs_rows(src, b.row_stride, N, K, kp, p, dst);
        continue;
      }
    }
    if (b.row_stride == 1) {
      gp::pack_b_pairs_from_steps(src, b.col_stride, N, K, kp, p, dst);
    } else {
      using Elem = std::conditional_t<std::is_same_v<Src, uint16_t>, BFloat16, float>;
      gp::pack_b_panel<true, Elem, BFloat16>(reinterpret_cast<const Elem*>(src), b.row_stride, b.col_stride, N,
                                             K, kp, p, dst);
    }
  }
}
#endif

template <bool PAIRS>
PackBFn pack_b_for(int src, int compute) {
  const DType s = dtype_from_tag(src), c = dtype_from_tag(compute);
#if VLMFAST_GEMM_X86
  if constexpr (PAIRS) {
    if (gemm_isa() >= GemmIsa::Avx512Bf16) {
      if (c == DType::BFloat16 && s == DType::BFloat16) return pack_b_pairs_fast<uint16_t>;
      if (c == DType::BFloat16 && s == DType::Float32) return pack_b_pairs_fast<float>;
    }
  } else {
    if (gemm_isa() >= GemmIsa::Avx512 && c == DType::Float32 && s == DType::Float32) return pack_b_f32_fast;
  }
#endif
  if (c == DType::BFloat16) {
    if (s == DType::Float32) return pack_b_range<PAIRS, float, BFloat16>;
    if (s == DType::BFloat16) return pack_b_range<PAIRS, BFloat16, BFloat16>;
  } else if constexpr (!PAIRS) {
    if (c == DType::Float16) {
      if (s == DType::Float32) return pack_b_range<PAIRS, float, Half>;
      if (s == DType::Float16) return pack_b_range<PAIRS, Half, Half>;
    } else {
      if (s == DType::Float32) return pack_b_range<PAIRS, float, float>;
      if (s == DType::BFloat16) return pack_b_range<PAIRS, BFloat16, float>;
      if (s == DType::Float16) return pack_b_range<PAIRS, Half, float>;
    }
  }
  throw std::invalid_argument("vlmfast gemm: B's dtype does not fit the compute dtype");
}

int64_t packed_k(int64_t K, PackedFormat format) {
  return format == PackedFormat::Bf16Pairs ? (K + 31) / 32 * 32 : K;
}

Activation activation_from_tag(int tag) {
  if (tag < 0 || tag > static_cast<int>(Activation::Gelu))
    throw std::invalid_argument("vlmfast: unknown activation tag " + std::to_string(tag));
  return static_cast<Activation>(tag);
}

// ---------------------------------------------------------------------------- peak

double thread_cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

// Every thread runs the kernel over its own L1-resident sliver and panel slice into one tile.
template <typename Kern, typename Layout>
__attribute__((always_inline)) inline double peak_loop(double ms) {
  using Op = typename Layout::Operand;
  constexpr int64_t kb = 256;
  alignas(64) Op a[Layout::MR * kb];
  alignas(64) Op b[NR * kb];
  alignas(64) float c[Layout::MR * NR];
  for (int64_t i = 0; i < Layout::MR * kb; ++i) a[i] = static_cast<Op>(i % 7 == 0 ? 0x3f80 : 0);
  for (int64_t i = 0; i < NR * kb; ++i) b[i] = static_cast<Op>(i % 5 == 0 ? 0x3f80 : 0);
  if constexpr (std::is_same_v<Op, float>) {
    for (int64_t i = 0; i < Layout::MR * kb; ++i) a[i] = 1e-3f * static_cast<float>(i % 7);
    for (int64_t i = 0; i < NR * kb; ++i) b[i] = 1e-3f * static_cast<float>(i % 5);
  }
  if constexpr (Driver<Kern, Layout>::requires_begin) Kern::begin();
  Kern::run(a, b, kb, c, NR, false);
  // This thread's CPU time, not the wall clock: on a shared machine the OS may run another
  // process on this core for a while, which says nothing about what the core can do.
  const double start = thread_cpu_ms();
  int64_t calls = 0;
  double elapsed = 0.0;
  do {
    for (int i = 0; i < 64; ++i) {
      Kern::run(a, b, kb, c, NR, true);
      __asm__ __volatile__("" : : "r"(c) : "memory");  // the tile is used: no call is elided
    }
    calls += 64;
    elapsed = thread_cpu_ms() - start;
  } while (elapsed < ms);
  if constexpr (Driver<Kern, Layout>::requires_begin) Kern::end();
  return 2.0 * Layout::MR * NR * kb * calls / (elapsed * 1e-3);
}

using PeakFn = double (*)(double);
VLMFAST_MULTIVERSION double peak_portable(double ms) {
  return peak_loop<gk::Portable, gp::F32Layout<gk::Portable::MR>>(ms);
}
#if VLMFAST_GEMM_X86
VLMFAST_TARGET_AVX2 double peak_avx2(double ms) { return peak_loop<gk::Avx2, gp::F32Layout<gk::Avx2::MR>>(ms); }
VLMFAST_TARGET_AVX512 double peak_avx512(double ms) {
  return peak_loop<gk::Avx512, gp::F32Layout<gk::Avx512::MR>>(ms);
}
VLMFAST_TARGET_AVX512BF16 double peak_avx512_bf16(double ms) {
  return peak_loop<gk::Avx512Bf16, gp::PairLayout<gk::Avx512Bf16::MR>>(ms);
}
VLMFAST_TARGET_AMX double peak_amx(double ms) { return peak_loop<gk::Amx, gp::AmxLayout>(ms); }
double peak_amx_emulated(double ms) { return peak_loop<gk::AmxEmulated, gp::AmxLayout>(ms); }
#endif

PeakFn peak_for(GemmIsa isa, PackedFormat format) {
#if VLMFAST_GEMM_X86
  if (format == PackedFormat::Bf16Pairs) {
    if (isa == GemmIsa::Amx) return g_amx_emulated.load() ? peak_amx_emulated : peak_amx;
    return peak_avx512_bf16;
  }
  if (isa >= GemmIsa::Avx512) return peak_avx512;
  if (isa == GemmIsa::Avx2) return peak_avx2;
#endif
  (void)isa;
  (void)format;
  return peak_portable;
}

}  // namespace

// ---------------------------------------------------------------------------- entry points

GemmIsa gemm_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const int forced = isa_from_name(std::getenv("VLMFAST_GEMM_ISA"));
    isa = static_cast<int>(best_available(forced < 0 ? static_cast<int>(GemmIsa::Amx) : forced));
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<GemmIsa>(isa);
}

GemmIsa gemm_force_isa(int isa) {
  if (isa < 0) {
    g_isa.store(-1);
    return gemm_isa();
  }
  const GemmIsa chosen = best_available(isa);
  g_isa.store(static_cast<int>(chosen));
  return chosen;
}

const char* gemm_isa_name(GemmIsa isa) { return kIsaNames[static_cast<int>(isa)]; }

bool gemm_isa_available(GemmIsa isa) { return isa_available(isa); }

PackedFormat gemm_packed_format(int compute_dtype) {
  return dtype_from_tag(compute_dtype) == DType::BFloat16 && gemm_isa() >= GemmIsa::Avx512Bf16
             ? PackedFormat::Bf16Pairs
             : PackedFormat::F32;
}

int64_t gemm_packed_b_bytes(int64_t N, int64_t K, PackedFormat format) {
  const int64_t elem = format == PackedFormat::Bf16Pairs ? 2 : 4;
  return ((N + NR - 1) / NR) * NR * packed_k(K, format) * elem;
}

void gemm_pack_b(Matrix b, int64_t N, int64_t K, int compute_dtype, PackedFormat format,
                 void* packed, int threads) {
  threads = resolve_threads(threads);
  const int64_t panels = (N + NR - 1) / NR, kp = packed_k(K, format);
  const PackBFn fn = format == PackedFormat::Bf16Pairs ? pack_b_for<true>(b.dtype, compute_dtype)
                                                       : pack_b_for<false>(b.dtype, compute_dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (panels > 1 && N * K > 65536)
  for (int64_t p = 0; p < panels; ++p) fn(b, N, K, kp, p, p + 1, packed);
}

namespace {

// act(A B^T + bias) on the kernel of the level in use for B's format.
void run_forward(const Problem& p, PackedFormat format, int threads) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K == 0) {  // empty reduction: act(bias)
    alignas(64) const float zeros[NR] = {};
    const FinishFn finish = finish_for(p.out_dtype);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n0 = 0; n0 < p.N; n0 += NR) finish(p, zeros, 0, m, 1, n0, std::min<int64_t>(NR, p.N - n0));
    return;
  }
  const GemmIsa isa = gemm_isa();
  auto ran = [](GemmIsa kernel) { g_kernel_calls[static_cast<int>(kernel)].fetch_add(1, std::memory_order_relaxed); };
#if VLMFAST_GEMM_X86
  if (format == PackedFormat::Bf16Pairs) {
    if (isa < GemmIsa::Avx512Bf16)
      throw std::invalid_argument("vlmfast gemm: B packed in bf16 pairs, but the level in use has no bf16 kernel");
    if (isa == GemmIsa::Amx) {
      ran(GemmIsa::Amx);
      return run_tasks<gp::AmxLayout>(p, g_amx_emulated.load() ? task_amx_emulated : task_amx, threads);
    }
    ran(GemmIsa::Avx512Bf16);
    return run_tasks<gp::PairLayout<gk::Avx512Bf16::MR>>(p, task_avx512_bf16, threads);
  }
  if (isa >= GemmIsa::Avx512) {
    ran(GemmIsa::Avx512);
    return run_tasks<gp::F32Layout<gk::Avx512::MR>>(p, task_avx512, threads);
  }
  if (isa == GemmIsa::Avx2) {
    ran(GemmIsa::Avx2);
    return run_tasks<gp::F32Layout<gk::Avx2::MR>>(p, task_avx2, threads);
  }
#else
  if (format == PackedFormat::Bf16Pairs) throw std::invalid_argument("vlmfast gemm: no bf16 kernel here");
  (void)isa;
#endif
  ran(GemmIsa::Portable);
  run_tasks<gp::F32Layout<gk::Portable::MR>>(p, task_portable, threads);
}

// Row blocks up to which B goes unpacked, each slice packed once per block: at two B is still
// read less than when packed whole (+5-7 % at 520 rows on a Zen 4); at three or four the two
// ways are even.
constexpr int64_t kUnpackedRowBlocks = 2;

// The most rows one block of A holds on the kernel run_forward picks for `format`.
int64_t row_block_limit(PackedFormat format) {
#if VLMFAST_GEMM_X86
  const GemmIsa isa = gemm_isa();
  if (format == PackedFormat::Bf16Pairs)
    return isa == GemmIsa::Amx ? blocking_for<gp::AmxLayout>().mc
                               : blocking_for<gp::PairLayout<gk::Avx512Bf16::MR>>().mc;
  if (isa >= GemmIsa::Avx512) return blocking_for<gp::F32Layout<gk::Avx512::MR>>().mc;
  if (isa == GemmIsa::Avx2) return blocking_for<gp::F32Layout<gk::Avx2::MR>>().mc;
#endif
  (void)format;
  return blocking_for<gp::F32Layout<gk::Portable::MR>>().mc;
}

void check_tags(int activation, int compute_dtype, int out_dtype, int a_dtype) {
  activation_from_tag(activation);
  dtype_from_tag(compute_dtype);
  dtype_from_tag(out_dtype);
  dtype_from_tag(a_dtype);
}

}  // namespace

void gemm_forward(Matrix a, const void* b_packed, PackedFormat format, int compute_dtype,
                  const float* bias, int64_t M, int64_t N, int64_t K, int activation, void* out,
                  int out_dtype, int64_t ldo, void* pre, int64_t ldp, int threads) {
  check_tags(activation, compute_dtype, out_dtype, a.dtype);
  const Problem p{a, b_packed, compute_dtype, bias, M, N, K, packed_k(K, format), activation_from_tag(activation),
                  out, out_dtype, ldo, pre, ldp};
  run_forward(p, format, resolve_threads(threads));
}

bool gemm_packs_in_tasks(int64_t M, int64_t N, int compute_dtype, int threads) {
  threads = resolve_threads(threads);
  const int64_t panels = (N + NR - 1) / NR;
  return M > 0 && M <= kUnpackedRowBlocks * row_block_limit(gemm_packed_format(compute_dtype)) &&
         panels >= 2 * threads;
}

void gemm_forward_unpacked(Matrix a, Matrix b, int compute_dtype, const float* bias, int64_t M, int64_t N,
                           int64_t K, int activation, void* out, int out_dtype, int64_t ldo, void* pre,
                           int64_t ldp, int threads) {
  check_tags(activation, compute_dtype, out_dtype, a.dtype);
  dtype_from_tag(b.dtype);
  threads = resolve_threads(threads);
  if (!gemm_packs_in_tasks(M, N, compute_dtype, threads))
    throw std::invalid_argument("vlmfast gemm: an unpacked B needs M within two blocks of rows and N of at least "
                                "two panels per thread (gemm_packs_in_tasks)");
  const PackedFormat format = gemm_packed_format(compute_dtype);
  Problem p{a, nullptr, compute_dtype, bias, M, N, K, packed_k(K, format), activation_from_tag(activation),
            out, out_dtype, ldo, pre, ldp};
  p.b_source = b;
  p.pack_b_slice = format == PackedFormat::Bf16Pairs ? pack_b_for<true>(b.dtype, compute_dtype)
                                                     : pack_b_for<false>(b.dtype, compute_dtype);
  run_forward(p, format, threads);
}

void gemm_emulate_amx(bool on) {
  g_amx_emulated.store(on);
  g_isa.store(-1);  // the level is chosen again
}

int64_t gemm_kernel_calls(GemmIsa kernel) {
  return g_kernel_calls[static_cast<int>(kernel)].load(std::memory_order_relaxed);
}

double gemm_measure_peak(int compute_dtype, double ms, int threads) {
  threads = resolve_threads(threads);
  const PeakFn fn = peak_for(gemm_isa(), gemm_packed_format(compute_dtype));
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    total += fn(ms);
    best = std::max(best, total);
  }
  return best * 1e-12;
}

std::string gemm_describe() {
  const CacheSizes& c = cache_sizes();
  const CpuFeatures& f = cpu_features();
  std::ostringstream s;
  s << "isa=" << gemm_isa_name(gemm_isa()) << "\n"
    << "l1d=" << c.l1d << "\nl2=" << c.l2 << "\nl3=" << c.l3 << "\ncache_source=" << c.source << "\n"
    << "avx2=" << f.avx2_fma << "\navx512=" << f.avx512 << "\navx512_bf16=" << f.avx512_bf16
    << "\namx_cpu=" << f.amx_bf16 << "\n";
#if VLMFAST_GEMM_X86
  s << "amx_usable=" << amx_usable() << "\n";
  const Blocking f32 = blocking_for<gp::F32Layout<gk::Avx512::MR>>();
  const Blocking bf16 = blocking_for<gp::PairLayout<gk::Avx512Bf16::MR>>();
  s << "f32_kc=" << f32.kc << "\nf32_mc=" << f32.mc << "\nbf16_kc=" << bf16.kc << "\nbf16_mc=" << bf16.mc << "\n";
#endif
  // B packed inside the tasks for up to this many blocks of rows (gemm_forward_unpacked): a line
  // of its own, so GEMM choices timed under another rule (ops/_choice_cache.py) are timed again
  s << "unpacked_b_row_blocks=" << kUnpackedRowBlocks << "\n";
  // The partition's costs: choices timed under other ones are timed again too.
  s << "partition_costs=" << kPackACost << "," << kReadBCost << "\n";
  return s.str();
}

}  // namespace vlmfast::cpu
