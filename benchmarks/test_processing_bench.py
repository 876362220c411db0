"""pytest-benchmark: image loading and preprocessing, vlmfast vs transformers' PIL image processors
(the same work, the same outputs: the tests assert equality, this file asserts it once more).

    pytest benchmarks/test_processing_bench.py --benchmark-only --benchmark-enable

Groups: clip (32 photos 480x640 -> float32 (32, 3, 224, 224) and the uint8 path for
ops.patch_embed), smolvlm (SmolVLM2-256M config: 2 photos -> tiles of 512), load (24 JPEG files).
"""

import os
import warnings

import numpy as np
import pytest
import torch

from tests.processing.synthetic import photo
from vlmfast.processing import CLIPImageProcessor, SmolVLMImageProcessor, load_images

transformers = pytest.importorskip("transformers")

WORKERS = min(8, os.cpu_count() or 1)
SMOLVLM2_256M = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1}


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def photos():
    return [photo(480, 640, seed=i) for i in range(32)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i in range(24):
        path = directory / f"{i}.jpg"
        photo(600, 800, seed=i).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.mark.benchmark(group="clip")
def test_clip_vlmfast(benchmark, photos):
    ours = CLIPImageProcessor()
    out = benchmark(ours, photos)
    want = quiet(transformers.CLIPImageProcessorPil(), photos[:2], return_tensors="pt")["pixel_values"]
    assert torch.equal(out.pixel_values[:2], want)


@pytest.mark.benchmark(group="clip")
def test_clip_vlmfast_threads(benchmark, photos):
    benchmark(CLIPImageProcessor(), photos, max_workers=WORKERS)


@pytest.mark.benchmark(group="clip")
def test_clip_vlmfast_uint8(benchmark, photos):
    out = benchmark(CLIPImageProcessor(), photos, output="uint8")
    assert out.pixel_values.shape == (32, 224, 224, 3)


@pytest.mark.benchmark(group="clip")
def test_clip_transformers(benchmark, photos):
    theirs = transformers.CLIPImageProcessorPil()
    benchmark(quiet, theirs, photos, return_tensors="pt")


@pytest.mark.benchmark(group="smolvlm")
def test_smolvlm_vlmfast(benchmark, photos):
    ours = SmolVLMImageProcessor(SMOLVLM2_256M)
    images = [[photos[0]], [photos[1]]]
    out = benchmark(ours, images)
    want = quiet(transformers.SmolVLMImageProcessorPil(**SMOLVLM2_256M), images, return_tensors="pt")
    assert torch.equal(out.pixel_values, want["pixel_values"])


@pytest.mark.benchmark(group="smolvlm")
def test_smolvlm_transformers(benchmark, photos):
    theirs = transformers.SmolVLMImageProcessorPil(**SMOLVLM2_256M)
    benchmark(quiet, theirs, [[photos[0]], [photos[1]]], return_tensors="pt")


@pytest.mark.benchmark(group="load")
def test_load_vlmfast_threads(benchmark, files):
    result = benchmark(load_images, files, max_workers=WORKERS)
    assert len(result.images) == len(files)


@pytest.mark.benchmark(group="load")
def test_load_vlmfast_one_thread(benchmark, files):
    benchmark(load_images, files, max_workers=1)


@pytest.mark.benchmark(group="load")
def test_load_transformers(benchmark, files):
    from transformers.image_utils import load_image

    images = benchmark(lambda: [np.asarray(load_image(path)) for path in files])
    assert np.array_equal(images[0], np.asarray(load_images(files[:1]).images[0]))
