"""Linear layers on the CPU: vlmfast.ops.linear against torch's F.linear (+ the activation as a
separate op) on the same inputs, in the same run, interleaved, in float32 or bfloat16.

Shapes (M rows = tokens, K in, N out):
  CLIP ViT-B/32 at batch 32: 1600 image tokens through qkv (768 -> 2304), proj (768 -> 768), fc1 +
    quick_gelu (768 -> 3072) and fc2 (3072 -> 768); 2464 text tokens through fc1 (512 -> 2048);
  SigLIP-B/16 (SmolVLM2's vision tower): one 512-px tile, 1024 patches, 768 wide, MLP 3072,
    gelu_tanh;
  SmolLM2-135M (SmolVLM2-256M's decoder) prefill of a 17-tile image + prompt, 1100 tokens: qkv
    (576 -> 960: 9 heads + 2 x 3 kv heads of 64), o_proj (576 -> 576), gate_up (576 -> 3072) and
    down (1536 -> 576).
Forward in inference (the packed weight cached, as a frozen model runs) and forward + backward (x,
weight and bias gradients: three GEMMs, the weight packed per call). Each Result carries the
GFLOP/s of both (`tflops` is vlmfast's, extra `peer_gflops` torch's); the runner divides by the
micro-kernel's measured peak for "% peak". Where ops.linear hands a shape class to torch (torch's
GEMM measured faster on this CPU, ops/_linear_choice.py) the case says "[torch]": both columns are
then torch's ("[vlmfast/torch]": the forward ours, the backward torch's; each is its own class). On CUDA, linear is torch's cuBLAS: the suite runs on the CPU only.
"""

import statistics
import time

import torch

from vlmfast import ops
from vlmfast.bench.timing import SHORT_MS, Result
from vlmfast.ops import _linear_choice, reference

# (name, M, K, N, activation)
VIT_B32 = [
    ("ViT-B/32 qkv", 1600, 768, 2304, None),
    ("ViT-B/32 proj", 1600, 768, 768, None),
    ("ViT-B/32 fc1+quick_gelu", 1600, 768, 3072, "quick_gelu"),
    ("ViT-B/32 fc2", 1600, 3072, 768, None),
    ("CLIP text fc1+quick_gelu", 2464, 512, 2048, "quick_gelu"),
]
SIGLIP_B16 = [
    ("SigLIP-B/16 qkv", 1024, 768, 2304, None),
    ("SigLIP-B/16 proj", 1024, 768, 768, None),
    ("SigLIP-B/16 fc1+gelu_tanh", 1024, 768, 3072, "gelu_tanh"),
    ("SigLIP-B/16 fc2", 1024, 3072, 768, None),
]
SMOLLM2 = [
    ("SmolLM2 qkv", 1100, 576, 960, None),
    ("SmolLM2 o_proj", 1100, 576, 576, None),
    ("SmolLM2 gate_up", 1100, 576, 3072, None),
    ("SmolLM2 down", 1100, 1536, 576, None),
]
CPU_CASES = VIT_B32 + SIGLIP_B16 + SMOLLM2
QUICK_CASES = [("quick", 64, 72, 80, "gelu")]
DTYPES = (torch.float32, torch.bfloat16)


def _interleaved_ms(fn, peer, repeats: int) -> tuple[float, float]:
    """Median ms of fn and of peer, timed alternately (a load that comes and goes on a shared
    machine falls on both); calls under SHORT_MS are looped to fill it."""
    for _ in range(2):
        fn()
        peer()
    loops = []
    for f in (fn, peer):
        start = time.perf_counter()
        f()
        once = (time.perf_counter() - start) * 1e3
        loops.append(1 if once >= SHORT_MS else min(1000, int(SHORT_MS / max(once, 1e-4)) + 1))
    samples = ([], [])
    for _ in range(repeats):
        for f, n, out in zip((fn, peer), loops, samples):
            start = time.perf_counter()
            for _ in range(n):
                f()
            out.append((time.perf_counter() - start) * 1e3 / n)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _backend_of(m, k, n, dtype, works) -> str:
    """The backend of each class (work) of these calls, "/"-joined when they differ."""
    found = []
    for work in works:
        backend = "vlmfast" if _linear_choice.mode() != "torch" else "torch"
        for d in _linear_choice.decisions():
            if (d["n"], d["k"], d["compute"], d["work"]) == (n, k, str(dtype), work) and d["m_bucket"] >= m > d["m_bucket"] // 2:
                backend = d["backend"]
        found.append(backend)
    return found[0] if len(set(found)) == 1 else "/".join(found)


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    device = torch.device(device)
    if device.type != "cpu" or dtype not in DTYPES:
        return []  # the C++ GEMM runs on the CPU; elsewhere linear is torch's own
    gen = torch.Generator().manual_seed(0)
    short = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "f32")
    results = []
    for name, m, k, n, act in QUICK_CASES if quick else CPU_CASES:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype)
        flops = 2.0 * m * n * k
        with torch.no_grad():
            out = ops.linear(x, w, b, activation=act)
            error = (out.double() - reference.linear(x.double(), w.double(), b.double(), act)).abs().max().item()
            ms, peer_ms = _interleaved_ms(lambda: ops.linear(x, w, b, activation=act),
                                          lambda: reference.linear(x, w, b, act), repeats=9)
        backend = _backend_of(m, k, n, dtype, ["cached"])
        label = f"{name} {m}x{k}x{n} {short}" + (" [torch]" if backend == "torch" else "")
        results.append(Result("linear", label, "vlmfast", ms, "torch F.linear + activation", peer_ms,
                              tflops=flops / ms / 1e9,
                              extra={"gflops": flops / ms / 1e6, "peer_gflops": flops / peer_ms / 1e6,
                                     "max_error_vs_fp64": error, "backend": backend}))

        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        grad = torch.randn(m, n, generator=gen).to(dtype)

        def step(fn):
            xg.grad = wg.grad = bg.grad = None
            fn().backward(grad)

        ms, peer_ms = _interleaved_ms(lambda: step(lambda: ops.linear(xg, wg, bg, activation=act)),
                                      lambda: step(lambda: reference.linear(xg, wg, bg, act)), repeats=5)
        backend = _backend_of(m, k, n, dtype, ["forward+pre" if act else "forward", "backward:xwb"])
        label = f"{name} {m}x{k}x{n} {short}, fwd+bwd" + (f" [{backend}]" if backend != "vlmfast" else "")
        results.append(Result("linear", label, "vlmfast", ms, "torch F.linear + activation",
                              peer_ms, tflops=3 * flops / ms / 1e9,
                              extra={"gflops": 3 * flops / ms / 1e6, "peer_gflops": 3 * flops / peer_ms / 1e6,
                                     "backend": backend}))
    return results
