"""pytest-benchmark: vlmfast.ops.scaled_dot_product_attention vs torch SDPA on the CPU, float32,
ViT-B/16 at batch 8: (B, H, L, E) = (8, 12, 197, 64), forward and forward+backward. Each group
holds vlmfast and its torch peer, measured in the same run:

    pytest benchmarks/test_attention_bench.py --benchmark-only --benchmark-enable

In the normal test run (--benchmark-disable) the shape shrinks so the module only checks that
every case runs and agrees with torch.
"""

import pytest
import torch
import torch.nn.functional as F

from vlmfast import ops

SHAPE = (8, 12, 197, 64)
TINY = (1, 2, 17, 64)


@pytest.fixture(scope="module")
def inputs(request):
    shape = TINY if request.config.getoption("benchmark_disable", False) else SHAPE
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, generator=gen)


IMPLS = {"vlmfast": ops.scaled_dot_product_attention, "torch": F.scaled_dot_product_attention}


@pytest.mark.benchmark(group="attention-fwd-cpu-f32")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, inputs, impl):
    q, k, v, _ = inputs
    fn = IMPLS[impl]

    def forward():
        with torch.no_grad():
            return fn(q, k, v)

    out = benchmark(forward)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.benchmark(group="attention-fwd+bwd-cpu-f32")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, inputs, impl):
    q, k, v, grad = inputs
    fn = IMPLS[impl]

    def forward_backward():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)
        return q.grad

    dq = benchmark(forward_backward)
    assert torch.isfinite(dq).all()
