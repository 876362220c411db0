"""SwiGLU's gate: vlmfast's fused op against the eager composite F.silu(gate) * up that
transformers' Llama MLP runs, forward and forward + backward.

Memory-bound: GB/s counts the fused op's traffic, reading gate_up (2 I) and writing the output
(I) forward; the backward reads gate_up and the gradient (3 I) and writes d gate_up (2 I). The
composite moves more (silu's output written and read again, the halves' gradients concatenated).
Shapes: the decoder MLPs of SmolVLM2 (I = 1536) and LLaVA-1.5-7B (I = 11008) at a training
batch's tokens; on the CPU fewer tokens, still past the last-level cache.
"""

import torch

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms
from vlmfast.ops import reference  # the eager composite F.silu(gate) * up

GPU_CASES = [(16384, 1536), (8192, 11008)]
CPU_CASES = [(2048, 1536), (1024, 3420)]  # past the L3 of the CPUs here (32 MiB)
QUICK_CASES = [(64, 96)]


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    results = []
    for rows, width in cases:
        case = f"gate_up=({rows}, 2x{width}) {str(dtype).removeprefix('torch.')}"
        gate_up = torch.randn(rows, 2 * width, device=device, dtype=dtype) * 3
        element = gate_up.element_size()
        with torch.inference_mode():
            ms = time_ms(lambda: ops.swiglu(gate_up), device)
            peer_ms = time_ms(lambda: reference.swiglu(gate_up), device)
        results.append(Result("swiglu", case, "vlmfast", ms, "torch composite", peer_ms,
                              gbps=3 * rows * width * element / ms / 1e6))

        grad = torch.randn(rows, width, device=device, dtype=dtype)
        leaf = gate_up.detach().requires_grad_()

        def fwd_bwd(fn):
            def step():
                leaf.grad = None
                fn(leaf).backward(grad)
            return step

        ms, peer_ms = time_ms(fwd_bwd(ops.swiglu), device), time_ms(fwd_bwd(reference.swiglu), device)
        results.append(Result("swiglu", case + " fwd+bwd", "vlmfast", ms, "torch composite", peer_ms,
                              gbps=8 * rows * width * element / ms / 1e6))
    return results
