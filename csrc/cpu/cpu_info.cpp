#include "cpu/cpu_info.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define VLMFAST_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace vlmfast::cpu {
namespace {

bool read_line(const std::string& path, std::string& out) {
  std::ifstream f(path);
  return static_cast<bool>(std::getline(f, out));
}

// "32K", "1024K", "32M" -> bytes.
int64_t parse_size(const std::string& text) {
  char unit = 0;
  long long value = 0;
  if (std::sscanf(text.c_str(), "%lld%c", &value, &unit) < 1) return 0;
  if (unit == 'K' || unit == 'k') return value << 10;
  if (unit == 'M' || unit == 'm') return value << 20;
  if (unit == 'G' || unit == 'g') return value << 30;
  return value;
}

// Logical CPUs in a sysfs list such as "0-3,8-11".
int count_cpus(const std::string& list) {
  int count = 0;
  std::stringstream ss(list);
  std::string part;
  while (std::getline(ss, part, ',')) {
    int a = 0, b = 0;
    const int n = std::sscanf(part.c_str(), "%d-%d", &a, &b);
    if (n == 2 && b >= a) count += b - a + 1;
    else if (n >= 1) count += 1;
  }
  return count > 0 ? count : 1;
}

// Linux describes every cache of cpu0 under /sys/devices/system/cpu/cpu0/cache/indexN. A cache
// shared by several logical CPUs (L3, or L2 between SMT siblings) is counted per CPU.
bool from_sysfs(CacheSizes& c) {
  bool any = false;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::string level, type, size, shared;
    if (!read_line(dir + "level", level) || !read_line(dir + "type", type) || !read_line(dir + "size", size))
      continue;
    if (type == "Instruction") continue;
    const int sharing = read_line(dir + "shared_cpu_list", shared) ? count_cpus(shared) : 1;
    const int64_t bytes = parse_size(size) / sharing;
    if (bytes <= 0) continue;
    if (level == "1") c.l1d = bytes, any = true;
    else if (level == "2") c.l2 = bytes, any = true;
    else if (level == "3") c.l3 = bytes, any = true;
  }
  return any;
}

#ifdef VLMFAST_X86
// CPUID's deterministic cache parameters: leaf 4 on Intel, 0x8000001D on AMD (topology extensions).
bool from_cpuid(CacheSizes& c) {
  unsigned a, b, cx, d;
  if (!__get_cpuid(0, &a, &b, &cx, &d)) return false;
  unsigned leaf = 4;
  if (b == 0x68747541) {  // "Auth"enticAMD
    if (!__get_cpuid(0x80000000, &a, &b, &cx, &d) || a < 0x8000001D) return false;
    leaf = 0x8000001D;
  } else if (a < 4) {
    return false;
  }
  bool any = false;
  for (unsigned sub = 0; sub < 16; ++sub) {
    __cpuid_count(leaf, sub, a, b, cx, d);
    const unsigned type = a & 0x1f, level = (a >> 5) & 0x7;
    if (type == 0) break;
    if (type == 2) continue;  // instruction cache
    const int64_t ways = ((b >> 22) & 0x3ff) + 1, partitions = ((b >> 12) & 0x3ff) + 1;
    const int64_t line = (b & 0xfff) + 1, sets = static_cast<int64_t>(cx) + 1;
    const int64_t sharing = ((a >> 14) & 0xfff) + 1;
    const int64_t bytes = ways * partitions * line * sets / sharing;
    if (level == 1) c.l1d = bytes, any = true;
    else if (level == 2) c.l2 = bytes, any = true;
    else if (level == 3) c.l3 = bytes, any = true;
  }
  return any;
}
#endif

CacheSizes detect_caches() {
  CacheSizes c;
  if (from_sysfs(c)) {
    c.source = "sysfs";
  }
#ifdef VLMFAST_X86
  else if (from_cpuid(c)) {
    c.source = "cpuid";
  }
#endif
  else {
    c.source = "default";
  }
  // Anything missing: the smallest figures of current server cores.
  if (c.l1d <= 0) c.l1d = 32 << 10;
  if (c.l2 <= 0) c.l2 = 512 << 10;
  if (c.l3 <= 0) c.l3 = c.l2;
  return c;
}

CpuFeatures detect_features() {
  CpuFeatures f;
#if defined(VLMFAST_X86) && !defined(__clang__)
  __builtin_cpu_init();
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  f.avx512_fp16 = f.avx512 && __builtin_cpu_supports("avx512fp16");
  f.amx_bf16 = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
#endif
  return f;
}

bool request_amx() {
#if defined(VLMFAST_X86) && defined(__linux__)
  if (!cpu_features().amx_bf16) return false;
  // The OS must have enabled the tile state in XCR0 (bits 17 TILECFG, 18 TILEDATA).
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  // Linux >= 5.16 hands the (8 KiB) tile data state out per process on request.
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) != 0) return false;
  unsigned long long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) return false;
  return (mask & (1ull << kXfeatureTileData)) != 0;
#else
  return false;
#endif
}

}  // namespace

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = detect_caches();
  return sizes;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_features();
  return features;
}

bool amx_usable() {
  static const bool usable = request_amx();
  return usable;
}

}  // namespace vlmfast::cpu
