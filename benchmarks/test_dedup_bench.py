"""pytest-benchmark: near-duplicate search and perceptual hashing.

    pytest benchmarks/test_dedup_bench.py --benchmark-only --benchmark-enable

Groups:
- pairs-1M: 1,000,000 random 64-bit hashes with 2,000 planted near pairs (1-4 bits apart), all
  pairs within distance 4, by the C++ pigeonhole search (5 bands of 13,13,13,13,12 bits).
- pairs-10k: 10,000 hashes, distance 4: the pigeonhole search vs the C++ tiled all-pairs kernel
  vs numpy (bitwise_count over all pairs): the same pairs from each.
- phash: 64 images 256x256, vlmfast.data.phash vs imagehash.phash (the same hashes).
"""

import numpy as np
import pytest
from PIL import Image

from vlmfast.data import find_duplicate_pairs, phash


def planted_hashes(n: int, planted: int, seed: int = 0):
    """n random hashes; `planted` targets overwritten by a copy of a source with 1-4 bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    picks = rng.choice(n, size=2 * planted, replace=False)
    sources, targets = picks[:planted], picks[planted:]
    flips = np.zeros(planted, dtype=np.uint64)
    for k in range(planted):
        for bit in rng.choice(64, size=int(rng.integers(1, 5)), replace=False):
            flips[k] |= np.uint64(1) << np.uint64(bit)
    hashes[targets] = hashes[sources] ^ flips
    pairs = {(int(min(s, t)), int(max(s, t))) for s, t in zip(sources, targets)}
    return hashes, pairs


@pytest.fixture(scope="module")
def million():
    return planted_hashes(1_000_000, 2_000)


@pytest.fixture(scope="module")
def ten_thousand():
    return planted_hashes(10_000, 100, seed=1)


@pytest.mark.benchmark(group="pairs-1M")
def test_pairs_1m_banded(benchmark, million):
    hashes, planted = million
    found = benchmark(find_duplicate_pairs, hashes, 4, method="banded")
    found_set = {tuple(p) for p in found.tolist()}
    assert planted <= found_set  # every planted pair, plus any random ones within 4 bits
    distances = np.bitwise_count(hashes[found[:, 0]] ^ hashes[found[:, 1]])
    assert distances.max() <= 4


@pytest.mark.benchmark(group="pairs-10k")
@pytest.mark.parametrize("method", ["banded", "all", "numpy"])
def test_pairs_10k(benchmark, ten_thousand, method):
    hashes, planted = ten_thousand
    found = benchmark(find_duplicate_pairs, hashes, 4, method=method)
    assert np.array_equal(found, find_duplicate_pairs(hashes, 4, method="banded"))
    assert planted <= {tuple(p) for p in found.tolist()}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)) for _ in range(64)]


@pytest.mark.benchmark(group="phash")
def test_phash_vlmfast(benchmark, images):
    hashes = benchmark(lambda: [phash(image) for image in images])
    imagehash = pytest.importorskip("imagehash")
    assert hashes[:8] == [int(str(imagehash.phash(image)), 16) for image in images[:8]]


@pytest.mark.benchmark(group="phash")
def test_phash_imagehash(benchmark, images):
    imagehash = pytest.importorskip("imagehash")
    benchmark(lambda: [imagehash.phash(image) for image in images])
