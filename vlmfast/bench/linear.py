"""Linear layers of CLIP ViT-B/32 at batch 32: vlmfast.ops.linear against torch's F.linear (+ the
activation as a separate op) on the same inputs, in the same run.

Shapes (M rows = tokens, K in, N out): the image tower's 32 x 50 = 1600 tokens through qkv
(768 -> 2304), proj (768 -> 768), fc1 + quick_gelu (768 -> 3072) and fc2 (3072 -> 768), and the
text tower's 32 x 77 = 2464 tokens through its fc1 (512 -> 2048). Forward in inference (the packed
weight cached, as a frozen model runs) and forward + backward (x, weight and bias gradients: three
GEMMs, the weight packed per call). Each Result carries the GFLOP/s of both (`tflops` is
vlmfast's, extra `peer_gflops` torch's). On CUDA, linear is torch's cuBLAS: the suite runs on the
CPU in float32 only.
"""

import torch

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms
from vlmfast.ops import reference

# (name, M, K, N, activation)
CPU_CASES = [
    ("B/32 qkv", 1600, 768, 2304, None),
    ("B/32 proj", 1600, 768, 768, None),
    ("B/32 fc1+quick_gelu", 1600, 768, 3072, "quick_gelu"),
    ("B/32 fc2", 1600, 3072, 768, None),
    ("B/32 text fc1+quick_gelu", 2464, 512, 2048, "quick_gelu"),
]
QUICK_CASES = [("quick", 64, 72, 80, "gelu")]


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    device = torch.device(device)
    if device.type != "cpu" or dtype != torch.float32:
        return []  # the C++ GEMM is float32-only; elsewhere linear is torch's own
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, m, k, n, act in QUICK_CASES if quick else CPU_CASES:
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / k**0.5
        b = torch.randn(n, generator=gen)
        flops = 2.0 * m * n * k
        label = f"{name} {m}x{k}x{n} f32"
        with torch.no_grad():
            error = (ops.linear(x, w, b, activation=act).double()
                     - reference.linear(x.double(), w.double(), b.double(), act)).abs().max().item()
            ms = time_ms(lambda: ops.linear(x, w, b, activation=act), device, repeats=7)
            peer_ms = time_ms(lambda: reference.linear(x, w, b, act), device, repeats=7)
        results.append(Result("linear", label, "vlmfast", ms, "torch F.linear + activation", peer_ms,
                              tflops=flops / ms / 1e9,
                              extra={"gflops": flops / ms / 1e6, "peer_gflops": flops / peer_ms / 1e6,
                                     "max_error_vs_fp64": error}))

        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        grad = torch.randn(m, n, generator=gen)

        def step(fn):
            xg.grad = wg.grad = bg.grad = None
            fn().backward(grad)

        ms = time_ms(lambda: step(lambda: ops.linear(xg, wg, bg, activation=act)), device, repeats=5)
        peer_ms = time_ms(lambda: step(lambda: reference.linear(xg, wg, bg, act)), device, repeats=5)
        results.append(Result("linear", label + ", fwd+bwd", "vlmfast", ms, "torch F.linear + activation",
                              peer_ms, tflops=3 * flops / ms / 1e9,
                              extra={"gflops": 3 * flops / ms / 1e6, "peer_gflops": 3 * flops / peer_ms / 1e6}))
    return results
