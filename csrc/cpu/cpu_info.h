// What the GEMMs need to know about the CPU they run on, read once per process: the data caches
// (sizes per core, from Linux's sysfs, else CPUID), the vector instruction sets, and whether the
// OS lets this process use AMX tiles. Nothing here assumes one vendor's figures: the blocking of
// csrc/cpu/gemm.cpp is derived from these numbers on every machine.
#pragma once

#include <cstdint>
#include <string>

namespace vlmfast::cpu {

struct CacheSizes {
  int64_t l1d = 0;  // bytes of level-1 data cache of one core
  int64_t l2 = 0;   // bytes of level-2 cache of one core (its share, when cores share it)
  int64_t l3 = 0;   // bytes of the last-level cache one core can count on (its share)
  std::string source;  // "sysfs", "cpuid" or "default": where the figures came from
};

// The caches of cpu0 (all cores of the machines this project runs on are alike).
const CacheSizes& cache_sizes();

struct CpuFeatures {
  bool avx2_fma = false;    // AVX2 + FMA (x86-64-v3)
  bool avx512 = false;      // AVX-512 F, BW, DQ, VL (x86-64-v4)
  bool avx512_bf16 = false; // vdpbf16ps
  bool avx512_fp16 = false;
  bool amx_bf16 = false;    // the CPU has AMX-TILE + AMX-BF16 (the OS may still refuse them)
};

const CpuFeatures& cpu_features();

// Whether this process may use AMX tiles: the CPU has them, the kernel supports their state, and
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) granted it (asked once; any failure: false).
bool amx_usable();

}  // namespace vlmfast::cpu
