"""pytest-benchmark: vlmfast.ops.infonce_loss / siglip_loss forward + backward against the
materialised loss (open_clip's formulas on the B x B logits) on the CPU, float32, D = 512,
B = 1024 .. 8192 (TARGETS.md: B = 8192 >= 2x faster). Each group holds vlmfast and its peer for
one (loss, B), measured in the same run:

    pytest benchmarks/test_losses_bench.py --benchmark-only --benchmark-enable

In the normal test run (--benchmark-disable) the batch shrinks to 97 so the module only checks that
every case runs and that vlmfast agrees with the peer. Peak memory: vlmfast/bench/losses.py.
"""

import pytest
import torch

from vlmfast.bench.losses import fused, make_inputs, materialised, step

SIZES = [1024, 2048, 4096, 8192]
TINY = 97
IMPLS = {"vlmfast": fused, "materialised": materialised}


@pytest.fixture(scope="module")
def benchmarking(request):
    return not request.config.getoption("benchmark_disable", False)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_forward_backward(benchmark, benchmarking, name, B, impl):
    B = B if benchmarking else TINY
    benchmark.group = f"{name}-fwd+bwd-cpu-f32-B{B}-D512"
    inputs = make_inputs(B, torch.device("cpu"), torch.float32)
    fn = IMPLS[impl](name)
    # A materialised B = 8192 step takes seconds: a few rounds, one warm-up.
    loss = benchmark.pedantic(step, args=(fn, name, *inputs), rounds=3, iterations=1, warmup_rounds=1)
    grads = [t.grad.clone() for t in inputs[:3]]
    expected = step(materialised(name), name, *inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for grad, t in zip(grads, inputs[:3]):
        torch.testing.assert_close(grad, t.grad, rtol=1e-4, atol=1e-6)
