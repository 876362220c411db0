#include "cpu/hamming.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "common/parallel.h"

namespace vlmfast::cpu {
namespace {

constexpr int64_t kTile = 512;  // 2 x 512 hashes = 8 KiB: both tiles stay in L1
// Below this many hashes a search takes a few milliseconds: one thread avoids paying OpenMP's
// start-up and barrier costs (large on a busy machine) for no gain.
constexpr int64_t kParallelMinHashes = 100000;
constexpr int64_t kParallelMinTiles = 8;

inline uint64_t pack(int64_t i, int64_t j) { return (static_cast<uint64_t>(i) << 32) | static_cast<uint64_t>(j); }

// Sorted (i, j) pairs from per-thread lists of packed pairs.
std::vector<int64_t> merge_sorted(std::vector<std::vector<uint64_t>>& per_thread) {
  std::vector<uint64_t> all;
  size_t total = 0;
  for (auto& v : per_thread) total += v.size();
  all.reserve(total);
  for (auto& v : per_thread) {
    all.insert(all.end(), v.begin(), v.end());
    std::vector<uint64_t>().swap(v);
  }
  // Packed as (i << 32 | j): sorting the integers sorts the pairs by (i, j).
  std::sort(all.begin(), all.end());
  std::vector<int64_t> out(2 * all.size());
  for (size_t p = 0; p < all.size(); ++p) {
    out[2 * p] = static_cast<int64_t>(all[p] >> 32);
    out[2 * p + 1] = static_cast<int64_t>(all[p] & 0xffffffffu);
  }
  return out;
}

// Pairs between tile rows [i0, i1) and tile columns [j0, j1), keeping j > i.
VLMFAST_MULTIVERSION
void scan_tiles(const uint64_t* h, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int d,
                std::vector<uint64_t>& out) {
  for (int64_t i = i0; i < i1; ++i) {
    const uint64_t hi = h[i];
    // A plain branch: hits are rare, so it is well predicted (measured faster than branch-free
    // compaction and than count-then-collect on AVX-512).
    for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
      if (__builtin_popcountll(hi ^ h[j]) <= d) out.push_back(pack(i, j));
    }
  }
}

// Candidate pairs inside one bucket (members ascending), verified by popcount; a pair is kept
// only if `band` is the first band on which its two hashes agree, so no pair is reported twice.
VLMFAST_MULTIVERSION
// `bucket_hashes` are the members' hashes gathered contiguously (bucket_hashes[a] = h[members[a]]):
// the quadratic loop then reads sequential memory instead of gathering from all n hashes.
VLMFAST_MULTIVERSION
void scan_bucket(const uint64_t* bucket_hashes, const int32_t* members, int64_t count, int d,
                 int band, const uint64_t* band_masks, std::vector<uint64_t>& out) {
  for (int64_t a = 0; a < count; ++a) {
    const uint64_t ha = bucket_hashes[a];
    for (int64_t b = a + 1; b < count; ++b) {
      const uint64_t x = ha ^ bucket_hashes[b];
      if (__builtin_popcountll(x) > d) continue;
      bool earlier = false;
      for (int e = 0; e < band; ++e) earlier |= (x & band_masks[e]) == 0;
      if (!earlier) out.push_back(pack(members[a], members[b]));
    }
  }
}

// Indices 0..n-1 grouped by key (stable, so ascending inside a group); `starts` has the offset
// of each group and a final end offset. Counting sort for narrow keys, a comparison sort otherwise.
void group_by_key(const std::vector<uint64_t>& keys, int width, std::vector<int32_t>& order,
                  std::vector<int64_t>& starts) {
  const int64_t n = static_cast<int64_t>(keys.size());
  order.resize(n);
  starts.clear();
  if (width <= 16) {
    std::vector<int64_t> offset((int64_t{1} << width) + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++offset[keys[i] + 1];
    std::partial_sum(offset.begin(), offset.end(), offset.begin());
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[keys[i]]++] = static_cast<int32_t>(i);
    for (size_t k = 0; k + 1 < offset.size(); ++k)
      if (offset[k + 1] - offset[k] > 1) starts.push_back(offset[k]), starts.push_back(offset[k + 1]);
    return;
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return keys[a] < keys[b]; });
  for (int64_t s = 0; s < n;) {
    int64_t e = s + 1;
    while (e < n && keys[order[e]] == keys[order[s]]) ++e;
    if (e - s > 1) starts.push_back(s), starts.push_back(e);
    s = e;
  }
}

}  // namespace

std::vector<int64_t> hamming_pairs_all(const uint64_t* hashes, int64_t n, int max_distance,
                                       int threads) {
  threads = resolve_threads(threads);
  std::vector<std::vector<uint64_t>> per_thread(threads);
  const int64_t tiles = (n + kTile - 1) / kTile;
  // Row tiles of the upper triangle: early tiles have more columns, hence dynamic scheduling.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (tiles >= kParallelMinTiles)
  for (int64_t ti = 0; ti < tiles; ++ti) {
#ifdef _OPENMP
    auto& out = per_thread[omp_get_thread_num()];
#else
    auto& out = per_thread[0];
#endif
    const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
    for (int64_t j0 = i0; j0 < n; j0 += kTile)
      scan_tiles(hashes, i0, i1, j0, std::min(n, j0 + kTile), max_distance, out);
  }
  return merge_sorted(per_thread);
}

std::vector<int64_t> hamming_pairs_banded(const uint64_t* hashes, int64_t n, int max_distance,
                                          int threads) {
  // 64 one-bit bands is the finest split; past that every pair qualifies anyway.
  if (max_distance >= 64) return hamming_pairs_all(hashes, n, max_distance, threads);
  threads = resolve_threads(threads);
  const int bands = max_distance + 1;
  // Widths as even as possible, wider bands first: 5 bands -> 13, 13, 13, 13, 12 bits.
  std::vector<int> width(bands, 64 / bands), shift(bands, 0);
  for (int b = 0; b < 64 % bands; ++b) ++width[b];
  for (int b = 1; b < bands; ++b) shift[b] = shift[b - 1] + width[b - 1];
  std::vector<uint64_t> band_masks(bands);
  for (int b = 0; b < bands; ++b)
    band_masks[b] = (width[b] == 64 ? ~uint64_t{0} : ((uint64_t{1} << width[b]) - 1)) << shift[b];

  std::vector<std::vector<uint64_t>> per_thread(threads);
  std::vector<uint64_t> keys(n), grouped_hashes(n);
  std::vector<int32_t> order;
  std::vector<int64_t> groups;  // [start0, end0, start1, end1, ...] of buckets with >= 2 members
  for (int b = 0; b < bands; ++b) {
    for (int64_t i = 0; i < n; ++i) keys[i] = (hashes[i] & band_masks[b]) >> shift[b];
    group_by_key(keys, width[b], order, groups);
    for (int64_t k = 0; k < n; ++k) grouped_hashes[k] = hashes[order[k]];
    const int64_t buckets = static_cast<int64_t>(groups.size() / 2);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16) if (n >= kParallelMinHashes)
    for (int64_t g = 0; g < buckets; ++g) {
#ifdef _OPENMP
      auto& out = per_thread[omp_get_thread_num()];
#else
      auto& out = per_thread[0];
#endif
      const int64_t s = groups[2 * g], e = groups[2 * g + 1];
      scan_bucket(grouped_hashes.data() + s, order.data() + s, e - s, max_distance, b,
                  band_masks.data(), out);
    }
  }
  return merge_sorted(per_thread);
}

}  // namespace vlmfast::cpu
