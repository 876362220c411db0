// Threading and run-time CPU feature selection shared by the CPU kernels.
#pragma once

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

}  // namespace vlmfast
