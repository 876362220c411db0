"""pytest-benchmark: fused linear + cross-entropy vs torch's materialised logits, forward +
backward on the CPU at SmolVLM2-256M's lm head (N = 4096 tokens, D = 576, V = 49280), float32
and bfloat16. Peak memory beyond the inputs goes into each benchmark's extra_info.

    pytest benchmarks/test_linear_cross_entropy_bench.py --benchmark-only --benchmark-enable

A step takes seconds on a 2-core machine: 3 rounds after one warm-up. In the normal test run
(--benchmark-disable) the shape shrinks so the module only checks that every step runs and is right.
"""

import pytest
import torch
import torch.nn.functional as F

from vlmfast import ops
from vlmfast.bench.linear_cross_entropy import _inputs, peak_extra_mib

SHAPE = (4096, 576, 49280)
TINY = (64, 32, 1000)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def inputs(request):
    shape = TINY if request.config.getoption("benchmark_disable", False) else SHAPE
    return _inputs(*shape, CPU, request.param)


def _fused(hidden, weight, labels):
    hidden.grad = weight.grad = None
    ops.linear_cross_entropy(hidden, weight, labels).backward()


def _materialised(hidden, weight, labels):
    hidden.grad = weight.grad = None
    F.cross_entropy((hidden @ weight.T).float(), labels).backward()


def _bench(benchmark, step, inputs):
    step(*inputs)
    benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(lambda: step(*inputs), CPU)
    benchmark.extra_info["tokens"] = inputs[0].shape[0]
    benchmark.pedantic(step, args=inputs, rounds=3, warmup_rounds=1)


def test_vlmfast(benchmark, inputs):
    _bench(benchmark, _fused, inputs)
    hidden, weight, labels = inputs
    # the step is right, not only fast: the loss equals torch's on the same inputs
    with torch.no_grad():
        fused = ops.linear_cross_entropy(hidden, weight, labels)
        expected = F.cross_entropy((hidden.double() @ weight.double().T), labels)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-4)


def test_torch_materialised(benchmark, inputs):
    _bench(benchmark, _materialised, inputs)
