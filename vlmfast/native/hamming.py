"""Launcher of the Hamming pair search in csrc/cpu/hamming.cpp (torch-free: numpy in, numpy out)."""

import numpy as np
import torch

from vlmfast import _extension

# Past this distance the bands get so narrow that bucketing saves little: compare every pair.
BANDED_MAX_DISTANCE = 10


def available() -> bool:
    return _extension.load("_C") is not None


def hamming_pairs(
    hashes: np.ndarray, max_distance: int, *, method: str = "auto", threads: int | None = None
) -> np.ndarray:
    """(P, 2) int64 pairs (i, j), i < j, sorted, with popcount(hashes[i] ^ hashes[j]) <= max_distance.

    hashes: (N,) uint64, C-contiguous (the caller validated it). method: "banded" (pigeonhole
    buckets), "all" (every pair, tiled) or "auto" (banded up to BANDED_MAX_DISTANCE).
    """
    module = _extension.load("_C")
    banded = method == "banded" or (method == "auto" and max_distance <= BANDED_MAX_DISTANCE)
    raw = module.hamming_pairs(
        hashes=hashes.ctypes.data, n=hashes.shape[0], max_distance=max_distance, banded=banded,
        threads=threads if threads is not None else torch.get_num_threads(),
    )
    return np.frombuffer(raw, dtype=np.int64).reshape(-1, 2)
