// The micro-kernels of the Linear GEMM (csrc/cpu/gemm.cpp), one per instruction set, and the
// layouts of the packed operands they read.
//
// Every kernel computes one MR x 32 tile of C = A B^T in float32, over kb reduction steps:
//   c[m * ldc + n] (+)= sum_k A(m, k) B(n, k)      (accumulate: add to what c holds)
// B arrives as a packed panel of 32 columns (csrc/cpu/gemm.cpp packs it once per weight), A as a
// packed sliver of MR rows (packed per block of rows inside the GEMM). The register-blocked
// kernels (AVX2, AVX-512, AVX512-BF16) also come as run_rows<R>: the first R < MR rows of a
// sliver only, for the last sliver of a block whose rows are not a multiple of MR (64 Q-Former
// rows are five slivers of 12 and one of 4: the full kernel spent a whole sliver's time on 4).
// Layouts:
//   F32 kernels (AVX-512 12 x 32, AVX2 6 x 32, portable 4 x 32), float operands:
//     A sliver a[k * MR + m]; B panel b[k * 32 + n].
//   BF16 pairs (AVX512-BF16 12 x 32), bfloat16 operands two reduction steps at a time:
//     A sliver a[(k / 2) * 2 MR + 2 m + k % 2]; B panel b[(k / 2) * 64 + 2 n + k % 2]
//     (vdpbf16ps: each float lane gets a0 b0 + a1 b1 of one (row, column) pair).
//   AMX (32 x 32), bfloat16 tiles: A sliver in 32-step tiles, row-major inside: a[(k / 32) * 1024
//     + m * 32 + k % 32]; B panel the BF16-pairs layout (a 16-column half of 16 pairs is one
//     tile row-strided by 128 bytes). kb is then a multiple of 32.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define VLMFAST_GEMM_X86 1
#define VLMFAST_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define VLMFAST_TARGET_AVX512BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#define VLMFAST_TARGET_AMX __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))
#define VLMFAST_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
// 512-bit vectors cross only inlined helpers here; the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 headers build shuffles and masked loads on _mm512_undefined_*(), which it then
// flags.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#else
#define VLMFAST_GEMM_X86 0
#endif

namespace vlmfast::cpu::gemm_kernels {

constexpr int NR = 32;  // columns of every tile and of a packed B panel

// ---------------------------------------------------------------------------- portable
// Plain loops, compiled inside multi-versioned functions: the compiler vectorises them for
// whatever the clone targets. The fallback of last resort.
struct Portable {
  static constexpr int MR = 4;
  using Operand = float;
  static inline void run(const float* a, const float* b, int64_t kb, float* c, int64_t ldc,
                         bool accumulate) {
    float acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) acc[m][n] = accumulate ? c[m * ldc + n] : 0.0f;
    for (int64_t k = 0; k < kb; ++k)
      for (int m = 0; m < MR; ++m) {
        const float am = a[k * MR + m];
        for (int n = 0; n < NR; ++n) acc[m][n] += am * b[k * NR + n];
      }
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) c[m * ldc + n] = acc[m][n];
  }
};

#if VLMFAST_GEMM_X86
// ---------------------------------------------------------------------------- AVX2 + FMA
// 16 ymm registers: 6 rows x 16 columns of accumulators (12), two B vectors, one broadcast; the
// 32-column panel in two passes over the (L1-resident) A sliver.
struct Avx2 {
  static constexpr int MR = 6;
  using Operand = float;
  VLMFAST_TARGET_AVX2 static inline void run(const float* a, const float* b, int64_t kb, float* c,
                                             int64_t ldc, bool accumulate) {
    run_rows<MR>(a, b, kb, c, ldc, accumulate);
  }
  template <int ROWS>
  VLMFAST_TARGET_AVX2 static inline void run_rows(const float* a, const float* b, int64_t kb,
                                                  float* c, int64_t ldc, bool accumulate) {
    for (int half = 0; half < 2; ++half) {
      __m256 lo[ROWS], hi[ROWS];
      float* ch = c + half * 16;
#pragma GCC unroll 6
      for (int m = 0; m < ROWS; ++m) {
        lo[m] = accumulate ? _mm256_loadu_ps(ch + m * ldc) : _mm256_setzero_ps();
        hi[m] = accumulate ? _mm256_loadu_ps(ch + m * ldc + 8) : _mm256_setzero_ps();
      }
      const float* bh = b + half * 16;
      for (int64_t k = 0; k < kb; ++k) {
        const __m256 b0 = _mm256_loadu_ps(bh + k * NR), b1 = _mm256_loadu_ps(bh + k * NR + 8);
#pragma GCC unroll 6
        for (int m = 0; m < ROWS; ++m) {
          const __m256 am = _mm256_broadcast_ss(a + k * MR + m);
          lo[m] = _mm256_fmadd_ps(am, b0, lo[m]);
          hi[m] = _mm256_fmadd_ps(am, b1, hi[m]);
        }
      }
#pragma GCC unroll 6
      for (int m = 0; m < ROWS; ++m) {
        _mm256_storeu_ps(ch + m * ldc, lo[m]);
        _mm256_storeu_ps(ch + m * ldc + 8, hi[m]);
      }
    }
  }
};

// ---------------------------------------------------------------------------- AVX-512
// 12 rows x 32 columns: 24 zmm accumulators, two B vectors and one broadcast of 32 registers;
// per step 14 loads feed 24 FMAs, which keeps two 512-bit FMA pipes busy on both Intel (two
// load ports) and AMD (native or double-pumped 512-bit units).
struct Avx512 {
  static constexpr int MR = 12;
  using Operand = float;
  VLMFAST_TARGET_AVX512 static inline void run(const float* a, const float* b, int64_t kb,
                                               float* c, int64_t ldc, bool accumulate) {
    run_strided(a, MR, b, NR, kb, c, ldc, accumulate);
  }
  template <int ROWS>
  VLMFAST_TARGET_AVX512 static inline void run_rows(const float* a, const float* b, int64_t kb,
                                                    float* c, int64_t ldc, bool accumulate) {
    run_strided<ROWS>(a, MR, b, NR, kb, c, ldc, accumulate);
  }
  // The same over operands read in place: A(m, k) = a[k * a_step + m] (12 contiguous rows per
  // step), B(k, n) = b[k * b_step + n] (32 contiguous columns per step), e.g. a tile of a
  // gradient and rows of a feature matrix (csrc/cpu/contrastive.cpp); ROWS < MR: the first
  // ROWS rows only.
  template <int ROWS = MR>
  VLMFAST_TARGET_AVX512 static inline void run_strided(const float* a, int64_t a_step, const float* b,
                                                       int64_t b_step, int64_t kb, float* c,
                                                       int64_t ldc, bool accumulate) {
    __m512 lo[ROWS], hi[ROWS];
    prefetch_tile(c, ldc, ROWS);
#pragma GCC unroll 12
    for (int m = 0; m < ROWS; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kb; ++k) {
      const __m512 b0 = _mm512_loadu_ps(b + k * b_step), b1 = _mm512_loadu_ps(b + k * b_step + 16);
      const float* ak = a + k * a_step;
#pragma GCC unroll 12
      for (int m = 0; m < ROWS; ++m) {
        const __m512 am = _mm512_set1_ps(ak[m]);
        lo[m] = _mm512_fmadd_ps(am, b0, lo[m]);
        hi[m] = _mm512_fmadd_ps(am, b1, hi[m]);
      }
    }
    store_tile<ROWS>(lo, hi, c, ldc, accumulate);
  }

  // The C tile's 2 MR lines, requested before the k loop: its rows lie a row of the output apart
  // (a new page every row or two), no prefetcher follows them, and a load or store at the end of
  // the loop would wait the full latency of L2/L3 per row.
  VLMFAST_TARGET_AVX512 static inline void prefetch_tile(const float* c, int64_t ldc, int rows) {
    for (int m = 0; m < rows; ++m) {
      _mm_prefetch(reinterpret_cast<const char*>(c + m * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + m * ldc + 16), _MM_HINT_T0);
    }
  }

  // c (+)= the accumulators (the earlier blocks' partial sums added at the end, their lines
  // prefetched since the start).
  template <int ROWS = MR>
  VLMFAST_TARGET_AVX512 static inline void store_tile(const __m512* lo, const __m512* hi, float* c,
                                                      int64_t ldc, bool accumulate) {
#pragma GCC unroll 12
    for (int m = 0; m < ROWS; ++m) {
      __m512 l = lo[m], h = hi[m];
      if (accumulate) {
        l = _mm512_add_ps(l, _mm512_loadu_ps(c + m * ldc));
        h = _mm512_add_ps(h, _mm512_loadu_ps(c + m * ldc + 16));
      }
      _mm512_storeu_ps(c + m * ldc, l);
      _mm512_storeu_ps(c + m * ldc + 16, h);
    }
  }
};

// ---------------------------------------------------------------------------- AVX512-BF16
// The AVX-512 kernel's register plan on bfloat16 pairs: per pair of steps, two 64-byte B loads
// (16 columns x 2 steps each), MR 32-bit broadcasts of A's pairs, 2 MR vdpbf16ps (each twice
// the products of an FMA).
struct Avx512Bf16 {
  static constexpr int MR = 12;
  using Operand = uint16_t;
  VLMFAST_TARGET_AVX512BF16 static inline void run(const uint16_t* a, const uint16_t* b,
                                                   int64_t kb, float* c, int64_t ldc,
                                                   bool accumulate) {
    run_rows<MR>(a, b, kb, c, ldc, accumulate);
  }
  template <int ROWS>
  VLMFAST_TARGET_AVX512BF16 static inline void run_rows(const uint16_t* a, const uint16_t* b,
                                                        int64_t kb, float* c, int64_t ldc,
                                                        bool accumulate) {
    __m512 lo[ROWS], hi[ROWS];
    Avx512::prefetch_tile(c, ldc, ROWS);
#pragma GCC unroll 12
    for (int m = 0; m < ROWS; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
    const int64_t pairs = kb / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh b0 = (__m512bh)_mm512_load_si512(b + p * 2 * NR);
      const __m512bh b1 = (__m512bh)_mm512_load_si512(b + p * 2 * NR + NR);
      const int32_t* ap = reinterpret_cast<const int32_t*>(a + p * 2 * MR);
#pragma GCC unroll 12
      for (int m = 0; m < ROWS; ++m) {
        const __m512bh am = (__m512bh)_mm512_set1_epi32(ap[m]);
        lo[m] = _mm512_dpbf16_ps(lo[m], am, b0);
        hi[m] = _mm512_dpbf16_ps(hi[m], am, b1);
      }
    }
    Avx512::store_tile<ROWS>(lo, hi, c, ldc, accumulate);
  }
};

// ---------------------------------------------------------------------------- AMX
// Eight tiles: four 16 x 16 float accumulators (a 32 x 32 tile of C), two A tiles (16 rows x 32
// steps) and two B tiles (16 pairs of steps x 16 columns x 2). Per 32 steps: four tile loads,
// four tdpbf16ps. The tile configuration is per thread: begin() loads it on the thread that runs
// the task, end() releases the state.
//
// The body is written once over four tile operations (a macro: the intrinsics take the tile
// number as a literal), so AmxEmulated below runs the very same addressing on plain arrays: the
// tests run the AMX layout, packing and driver on CPUs without AMX through it.
#define VLMFAST_AMX_RUN(LOAD, ZERO, STORE, DP)                                  \
  const int64_t cs = ldc * static_cast<int64_t>(sizeof(float));                \
  if (accumulate) {                                                             \
    LOAD(0, c, cs);                                                             \
    LOAD(1, c + 16, cs);                                                        \
    LOAD(2, c + 16 * ldc, cs);                                                  \
    LOAD(3, c + 16 * ldc + 16, cs);                                             \
  } else {                                                                      \
    ZERO(0);                                                                    \
    ZERO(1);                                                                    \
    ZERO(2);                                                                    \
    ZERO(3);                                                                    \
  }                                                                             \
  for (int64_t k = 0; k < kb; k += K_STEP) {                                    \
    const uint16_t* ak = a + k * MR; /* 32 rows x 32 steps, 64 bytes a row */   \
    const uint16_t* bk = b + k * NR; /* 16 pairs x 64 bf16, 128 bytes a pair */ \
    LOAD(4, ak, 64);                                                            \
    LOAD(5, ak + 16 * 32, 64);                                                  \
    LOAD(6, bk, 2 * NR * 2);                                                    \
    LOAD(7, bk + 32, 2 * NR * 2);                                               \
    DP(0, 4, 6);                                                                \
    DP(1, 4, 7);                                                                \
    DP(2, 5, 6);                                                                \
    DP(3, 5, 7);                                                                \
  }                                                                             \
  STORE(0, c, cs);                                                              \
  STORE(1, c + 16, cs);                                                         \
  STORE(2, c + 16 * ldc, cs);                                                   \
  STORE(3, c + 16 * ldc + 16, cs);

struct Amx {
  static constexpr int MR = 32;
  static constexpr int K_STEP = 32;
  using Operand = uint16_t;

  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  };

  VLMFAST_TARGET_AMX static inline void begin() {
    Config cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  VLMFAST_TARGET_AMX static inline void end() { _tile_release(); }

  VLMFAST_TARGET_AMX static inline void run(const uint16_t* a, const uint16_t* b, int64_t kb,
                                            float* c, int64_t ldc, bool accumulate) {
    VLMFAST_AMX_RUN(_tile_loadd, _tile_zero, _tile_stored, _tile_dpbf16ps)
  }
};

// The AMX kernel on eight emulated tiles (16 rows x 64 bytes each, per thread), tdpbf16ps's
// arithmetic in plain float32: for tests only (slow), enabled by gemm_emulate_amx.
struct AmxEmulated {
  static constexpr int MR = 32;
  static constexpr int K_STEP = 32;
  using Operand = uint16_t;

  struct Tiles {
    alignas(64) uint8_t t[8][16][64];
  };
  static Tiles& tiles() {
    static thread_local Tiles file;
    return file;
  }
  static void load(int t, const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(tiles().t[t][r], static_cast<const char*>(p) + r * stride, 64);
  }
  static void zero(int t) { std::memset(tiles().t[t], 0, sizeof tiles().t[t]); }
  static void store(int t, void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(p) + r * stride, tiles().t[t][r], 64);
  }
  static float bf16(uint16_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // C (16 x 16 float) += A (16 x 32 bf16) B (16 pairs x 16 x 2 bf16), pair by pair
  static void dp(int tc, int ta, int tb) {
    float cf[16][16];
    uint16_t af[16][32], bf[16][32];
    std::memcpy(cf, tiles().t[tc], sizeof cf);
    std::memcpy(af, tiles().t[ta], sizeof af);
    std::memcpy(bf, tiles().t[tb], sizeof bf);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) {
        float acc = cf[m][n];
        for (int p = 0; p < 16; ++p)
          acc += bf16(af[m][2 * p]) * bf16(bf[p][2 * n]) + bf16(af[m][2 * p + 1]) * bf16(bf[p][2 * n + 1]);
        cf[m][n] = acc;
      }
    std::memcpy(tiles().t[tc], cf, sizeof cf);
  }
  static inline void run(const uint16_t* a, const uint16_t* b, int64_t kb, float* c, int64_t ldc,
                         bool accumulate) {
    VLMFAST_AMX_RUN(load, zero, store, dp)
  }
};
#undef VLMFAST_AMX_RUN
#endif

}  // namespace vlmfast::cpu::gemm_kernels
