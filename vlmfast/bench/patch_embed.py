"""Patch embedding from uint8 images: vlmfast against torch's permute + float + normalise + conv2d
and against the bare GEMM that sequence contains (TARGETS.md).

Shapes: 32 x 224 x 224 x 3, p 16, D 768 on the CPU; batch 256 (and a ViT-L/14-336 batch) on a GPU.
Each Result: vlmfast's ms against the torch sequence (peer, `speedup` = peer ms / ms), TFLOP/s of
the GEMM (2 B N K D), and in `extra` the bare GEMM's ms (a (B N, K) @ (K, D) matmul of the
weight's dtype, what any implementation must at least do) with `gemm_over` = ms / GEMM ms (target
<= 1.2 on a GPU). On a GPU both vlmfast backends are timed: Triton (the default: the patch gather
inside the GEMM's K loop) and CUDA (gather kernel + cuBLAS), each its own case.
"""

import os

import torch
import torch.nn.functional as F

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms

MEAN, STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
# (batch, image side, channels, patch, embed dim)
CPU_CASES = [(32, 224, 3, 16, 768)]
GPU_CASES = [(256, 224, 3, 16, 768), (256, 224, 3, 32, 768), (64, 336, 3, 14, 1024)]
QUICK_CASES = [(2, 64, 3, 16, 64)]


def torch_sequence(images, weight, bias, mean, std):
    """What a torch user writes: channels-first float, scale, normalise, strided conv."""
    x = images.permute(0, 3, 1, 2).to(weight.dtype) / 255.0
    x = (x - mean) / std
    return F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)


class _forced_backend:
    """VLMFAST_BACKEND set for the duration of a block (None: the default order)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = os.environ.get("VLMFAST_BACKEND")
        if self.name is None:
            os.environ.pop("VLMFAST_BACKEND", None)
        else:
            os.environ["VLMFAST_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("VLMFAST_BACKEND", None)
        else:
            os.environ["VLMFAST_BACKEND"] = self.saved


def _backends(device: torch.device) -> list[str | None]:
    from vlmfast.ops import _dispatch

    if device.type != "cuda":
        return [None]
    return [name for name in ("triton", "cuda") if _dispatch._runs_on(name, "cuda")] or [None]


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    device = torch.device(device)
    cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch, side, channels, patch, d in cases:
        images = torch.randint(0, 256, (batch, side, side, channels), dtype=torch.uint8, generator=gen).to(device)
        weight = (torch.randn(d, channels, patch, patch, generator=gen) * 0.02).to(device=device, dtype=dtype)
        bias = torch.randn(d, generator=gen).to(device=device, dtype=dtype)
        mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, -1, 1, 1)
        std = torch.tensor(STD, device=device, dtype=dtype).view(1, -1, 1, 1)
        n, k = (side // patch) ** 2, channels * patch * patch
        flops = 2.0 * batch * n * k * d
        patches = torch.randn(batch * n, k, generator=gen).to(device=device, dtype=dtype)
        flat_t = weight.reshape(d, k).T.contiguous()

        with torch.no_grad():
            peer_ms = time_ms(lambda: torch_sequence(images, weight, bias, mean, std), device)
            gemm_ms = time_ms(lambda: torch.addmm(bias, patches, flat_t), device)
            for backend in _backends(device):
                with _forced_backend(backend):
                    out = ops.patch_embed(images, weight, bias, mean=MEAN, std=STD)
                    expected = torch_sequence(images, weight.float(), bias.float(), mean.float(), std.float())
                    error = (out.float() - expected).abs().max().item()
                    ms = time_ms(lambda: ops.patch_embed(images, weight, bias, mean=MEAN, std=STD), device)
                name = "vlmfast" + (f"-{backend}" if backend else "")
                case = f"{batch}x{side}x{side}x{channels} u8, p{patch}, D{d}, {str(dtype).removeprefix('torch.')}"
                case += f" [{backend}]" if backend else ""
                results.append(Result(
                    "patch_embed", case, name, ms, "torch permute+float+normalise+conv2d", peer_ms,
                    tflops=flops / ms / 1e9,
                    extra={"gemm_ms": gemm_ms, "gemm_over": ms / gemm_ms, "max_error_vs_fp32": error},
                ))

        # Training: forward + backward to weight and bias (uint8 images get no gradient).
        w = weight.detach().requires_grad_()
        b = bias.detach().requires_grad_()
        grad = torch.randn(batch, n, d, generator=gen).to(device=device, dtype=dtype)

        def vlmfast_step():
            w.grad = b.grad = None
            ops.patch_embed(images, w, b, mean=MEAN, std=STD).backward(grad)

        def torch_step():
            w.grad = b.grad = None
            torch_sequence(images, w, b, mean, std).backward(grad)

        ms, peer_ms = time_ms(vlmfast_step, device), time_ms(torch_step, device)
        case = f"{batch}x{side}x{side}x{channels} u8, p{patch}, D{d}, {str(dtype).removeprefix('torch.')}, fwd+bwd"
        results.append(Result("patch_embed", case, "vlmfast", ms, "torch permute+float+normalise+conv2d",
                              # forward + the weight gradient: uint8 images need no image gradient
                              peer_ms, tflops=2 * flops / ms / 1e9))
    return results
