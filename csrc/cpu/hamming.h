// Near-duplicate search over 64-bit perceptual hashes: all pairs within a Hamming distance.
//
// Both finders return the pairs (i, j), i < j, with popcount(hashes[i] ^ hashes[j]) <= max_distance,
// sorted by (i, j), flattened as [i0, j0, i1, j1, ...]. Indices must fit in 32 bits.
#pragma once

#include <cstdint>
#include <vector>

namespace vlmfast::cpu {

// Every pair compared, in cache-sized tiles: O(n^2 / 2) popcounts, any max_distance.
std::vector<int64_t> hamming_pairs_all(const uint64_t* hashes, int64_t n, int max_distance,
                                       int threads);

// Pigeonhole search: the 64 bits are cut into max_distance + 1 bands, so two hashes within
// max_distance agree exactly on at least one band. Hashes are bucketed by each band's value and
// only pairs sharing a bucket are checked; a pair is reported for the first band it agrees on.
// Fast while the bands are wide (max_distance <= ~10); exact for any max_distance <= 63.
std::vector<int64_t> hamming_pairs_banded(const uint64_t* hashes, int64_t n, int max_distance,
                                          int threads);

}  // namespace vlmfast::cpu
