"""vlmfast attention against every torch SDPA backend, forward and forward+backward.

One Result per (shape, pass): vlmfast's ms against the fastest torch SDPA backend of the same run
(peer = "torch-math", "torch-efficient", "torch-flash" or "torch-cudnn"); extra["backends_ms"]
holds every implementation's ms (vlmfast+rotary: the rotary applied inside the kernel). ms:
median, CUDA events on a GPU, wall clock on the CPU; TFLOP/s: 4 B H L S E for the forward, 2.5x
that more for the backward. Backends that fail on the shape (cuDNN without support, flash with
E = 72, anything on the CPU but math) are left out. Shapes: TARGETS.md's on a GPU, ViT-B/16 at
batch 8 on the CPU, and one SmolVLM2 decode step (GQA, 1 query).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms

# (B, H, L, E), from TARGETS.md: ViT-B/32, ViT-B/16, ViT-L/14-336, SigLIP-so400m, SmolVLM vision.
GPU_SHAPES = [(256, 12, 50, 64), (256, 12, 197, 64), (64, 16, 577, 64), (64, 16, 729, 72), (64, 12, 1024, 64)]
CPU_SHAPES = [(8, 12, 197, 64)]
QUICK_SHAPES = [(2, 2, 33, 64)]
# One decode step of SmolVLM2's decoder: 1 query, 9 heads on 3 kv heads, a 2048-token KV cache.
DECODE = dict(batch=32, heads=9, kv_heads=3, keys=2048, head_dim=64)
TORCH_BACKENDS = {
    "torch-math": SDPBackend.MATH,
    "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "torch-flash": SDPBackend.FLASH_ATTENTION,
    "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention_flops(batch, heads, length, keys, head_dim, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * keys * head_dim
    return forward * (3.5 if backward else 1.0)  # forward + a backward of 2.5x the forward


def _inputs(batch, heads, kv_heads, length, keys, head_dim, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = make(batch, heads, length, head_dim)
    k, v = make(batch, kv_heads, keys, head_dim), make(batch, kv_heads, keys, head_dim)
    grad = torch.randn(batch, heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, grad


def _passes(fn, q, k, v, grad):
    """{"fwd": callable, "fwd+bwd": callable} for one attention implementation."""

    def forward():
        with torch.no_grad():
            return fn(q, k, v)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _implementations(q, k, v, rotary):
    gqa = k.shape[1] != q.shape[1]
    impls = {"vlmfast": lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, enable_gqa=gqa)}
    if rotary is not None:
        impls["vlmfast+rotary"] = lambda a, b, c: ops.scaled_dot_product_attention(
            a, b, c, enable_gqa=gqa, rotary=rotary)
    if gqa:
        # Most torch backends lack GQA: give them K/V already repeated per query head (outside
        # the timing, which favours torch), as transformers' repeat_kv does.
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = (t.detach().repeat_interleave(group, dim=1) for t in (k, v))
    for name, backend in TORCH_BACKENDS.items():
        if gqa:
            impls[name] = (backend, lambda a, b, c: F.scaled_dot_product_attention(a, k_rep, v_rep))
        else:
            impls[name] = (backend, lambda a, b, c: F.scaled_dot_product_attention(a, b, c))
    return impls


def _measure(case: str, impls, q, k, v, grad, device, flops, backward_too=True) -> list[Result]:
    """Times every implementation on every pass; one Result per pass for vlmfast."""
    backends_ms = {"fwd": {}, "fwd+bwd": {}}
    for name, impl in impls.items():
        backend = None
        if isinstance(impl, tuple):
            backend, impl = impl
        for pass_name, fn in _passes(impl, q, k, v, grad).items():
            if pass_name == "fwd+bwd" and not backward_too:
                continue
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    fn()  # compiles / checks support before timing
                    backends_ms[pass_name][name] = time_ms(fn, device)
            except (RuntimeError, NotImplementedError, ValueError):
                continue  # this torch backend does not support the shape, dtype or device
    results = []
    for pass_name, timings in backends_ms.items():
        if "vlmfast" not in timings:
            continue
        ms = timings["vlmfast"]
        torch_ms = {name: t for name, t in timings.items() if name.startswith("torch-")}
        peer = min(torch_ms, key=torch_ms.get) if torch_ms else None
        results.append(Result("attention", f"{case} {pass_name}", "vlmfast", ms, peer,
                              torch_ms[peer] if peer else None, tflops=flops(pass_name == "fwd+bwd") / ms / 1e9,
                              extra={"backends_ms": timings}))
    return results


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    """Results as described in the module docstring, for every shape of the device."""
    device = torch.device(device)
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    name = str(dtype).removeprefix("torch.")
    results = []
    for batch, heads, length, head_dim in shapes:
        q, k, v, grad = _inputs(batch, heads, heads, length, length, head_dim, dtype, device)
        angles = torch.rand(length, head_dim // 2, device=device) * 6.28
        rotary = (angles.cos(), angles.sin())
        case = f"{batch}x{heads}x{length}x{head_dim} {name}"
        results += _measure(case, _implementations(q, k, v, rotary), q, k, v, grad, device,
                            lambda bwd, s=(batch, heads, length, length, head_dim): attention_flops(*s, bwd))
    d = DECODE if not quick else dict(batch=2, heads=4, kv_heads=2, keys=70, head_dim=64)
    q, k, v, grad = _inputs(d["batch"], d["heads"], d["kv_heads"], 1, d["keys"], d["head_dim"], dtype, device)
    case = f"decode {d['batch']}x{d['heads']}/{d['kv_heads']}x1x{d['keys']}x{d['head_dim']} {name}"
    results += _measure(case, _implementations(q, k, v, None), q, k, v, grad, device,
                        lambda bwd: attention_flops(d["batch"], d["heads"], 1, d["keys"], d["head_dim"], bwd),
                        backward_too=False)
    return results
