"""pytest-benchmark: vlmfast.ops.linear vs torch's F.linear (+ activation) on the CPU, float32, at
CLIP ViT-B/32's shapes for batch 32 (1600 tokens: qkv, proj, fc1 + quick_gelu, fc2), forward in
inference and forward + backward. Each group holds vlmfast and torch, measured in the same run:

    pytest benchmarks/test_linear_bench.py --benchmark-only --benchmark-enable

In the normal test run (--benchmark-disable) the rows shrink so the module only checks that every
case runs and agrees with torch. GFLOP/s per shape: `vlmfast bench linear`.
"""

import pytest
import torch

from vlmfast import ops
from vlmfast.ops import reference

# (name, K, N, activation) at M = 1600 tokens
SHAPES = [("qkv", 768, 2304, None), ("proj", 768, 768, None), ("fc1", 768, 3072, "quick_gelu"),
          ("fc2", 3072, 768, None)]
ROWS, TINY_ROWS = 1600, 40


def _inputs(request, k, n):
    rows = TINY_ROWS if request.config.getoption("benchmark_disable", False) else ROWS
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return x, w, torch.randn(n, generator=gen), torch.randn(rows, n, generator=gen)


IMPLS = {
    "vlmfast": lambda x, w, b, act: ops.linear(x, w, b, activation=act),
    "torch": lambda x, w, b, act: reference.linear(x, w, b, act),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward(benchmark, request, shape, impl):
    name, k, n, act = shape
    benchmark.group = f"linear-fwd-{name}-cpu-f32"
    x, w, b, _ = _inputs(request, k, n)
    fn = IMPLS[impl]

    def forward():
        with torch.no_grad():
            return fn(x, w, b, act)

    out = benchmark(forward)
    expected = reference.linear(x.double(), w.double(), b.double(), act)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_backward(benchmark, request, shape, impl):
    name, k, n, act = shape
    benchmark.group = f"linear-fwd+bwd-{name}-cpu-f32"
    x, w, b, grad = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(request, k, n)))
    fn = IMPLS[impl]

    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b, act).backward(grad)
        return x.grad, w.grad, b.grad

    grads = benchmark(step)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    reference.linear(x64, w64, b64, act).backward(grad.double())
    for got, want in zip(grads, (x64.grad, w64.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item()))
