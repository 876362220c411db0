"""pytest-benchmark: vlmfast.ops.patch_embed vs torch's permute + float + normalise + conv2d on
the CPU, float32, 32 x 224 x 224 x 3 uint8 images, p = 16, D = 768 (TARGETS.md: >= 2x), forward
and forward+backward (weight and bias). Each group holds vlmfast and its torch peer, measured in
the same run:

    pytest benchmarks/test_patch_embed_bench.py --benchmark-only --benchmark-enable

In the normal test run (--benchmark-disable) the batch shrinks so the module only checks that
every case runs and agrees with torch.
"""

import pytest
import torch

from vlmfast.bench.patch_embed import MEAN, STD, torch_sequence
from vlmfast import ops

SHAPE = (32, 224, 224, 3)
TINY = (2, 32, 48, 3)


@pytest.fixture(scope="module")
def inputs(request):
    shape = TINY if request.config.getoption("benchmark_disable", False) else SHAPE
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    weight = (torch.randn(768, 3, 16, 16, generator=gen) * 0.02).requires_grad_()
    bias = torch.randn(768, generator=gen).requires_grad_()
    n = (shape[1] // 16) * (shape[2] // 16)
    return images, weight, bias, torch.randn(shape[0], n, 768, generator=gen)


def _torch(images, weight, bias):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return torch_sequence(images, weight, bias, mean, std)


def _vlmfast(images, weight, bias):
    return ops.patch_embed(images, weight, bias, mean=MEAN, std=STD)


IMPLS = {"vlmfast": _vlmfast, "torch": _torch}


@pytest.mark.benchmark(group="patch_embed-fwd-cpu-f32")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, inputs, impl):
    images, weight, bias, _ = inputs
    fn = IMPLS[impl]

    def forward():
        with torch.no_grad():
            return fn(images, weight, bias)

    out = benchmark(forward)
    with torch.no_grad():
        expected = _torch(images, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.benchmark(group="patch_embed-fwd+bwd-cpu-f32")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, inputs, impl):
    images, weight, bias, grad = inputs
    fn = IMPLS[impl]

    def forward_backward():
        weight.grad = bias.grad = None
        fn(images, weight, bias).backward(grad)
        return weight.grad

    grad_weight = benchmark(forward_backward)
    assert torch.isfinite(grad_weight).all()
