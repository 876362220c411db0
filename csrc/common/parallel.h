// Threading and run-time CPU feature selection shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

// Compiles a function for AVX-512, AVX2 and the baseline; the dynamic loader picks the best one
// the CPU supports the first time it is called (GCC function multi-versioning). This keeps the
// wheel portable while the hot loops still use the widest vectors the machine has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VLMFAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLMFAST_MULTIVERSION
#endif

namespace vlmfast {

// Threads to use: the caller's request (torch.get_num_threads() on the Python side), at least 1.
inline int resolve_threads(int requested) { return requested > 0 ? requested : 1; }

// Splits [0, n) into one contiguous chunk per thread (no more threads than items) and runs
// work(begin, end) on each: for kernels whose items cost the same.
template <typename Work> void parallel_chunks(int64_t n, int threads, Work&& work) {
  threads = static_cast<int>(std::min<int64_t>(resolve_threads(threads), std::max<int64_t>(n, 1)));
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
#else
    const int64_t parts = 1, part = 0;
#endif
    const int64_t begin = n * part / parts, end = n * (part + 1) / parts;
    if (begin < end) work(begin, end);
  }
}

}  // namespace vlmfast
