"""vlmfast attention against every torch SDPA backend, forward and forward+backward.

One Result per (shape, pass): vlmfast's ms against the fastest torch SDPA backend of the same run
(peer = "torch-math", "torch-efficient", "torch-flash" or "torch-cudnn"); extra["backends_ms"]
holds every implementation's ms (vlmfast+rotary: the rotary applied inside the kernel). ms:
median, CUDA events on a GPU, wall clock on the CPU; TFLOP/s: 4 B H L S E for the forward, 2.5x
that more for the backward. Backends that fail on the shape (cuDNN without support, flash with
E = 72, anything on the CPU but math) are left out. Shapes: TARGETS.md's on a GPU, ViT-B/16 at
batch 8, SmolVLM2's vision tile (1, 12, 1024, 64) and a small call (2, 2, 33, 64) (the per-call
cost) on the CPU, and SmolVLM2 decode steps
(GQA, 1 query; batch 1 and 32, 128 to 2048 keys, with and without a key-padding mask).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms

# (B, H, L, E), from TARGETS.md: ViT-B/32, ViT-B/16, ViT-L/14-336, SigLIP-so400m, SmolVLM vision.
GPU_SHAPES = [(256, 12, 50, 64), (256, 12, 197, 64), (64, 16, 577, 64), (64, 16, 729, 72), (64, 12, 1024, 64)]
# A small call, where the op layer's per-call cost (validation, dispatch, autograd) shows
# against torch's rather than the kernel: target <= 1.2x torch's time, forward and backward.
SMALL_CALL = (2, 2, 33, 64)
# SmolVLM2's vision tower on one 512-px tile (1024 patches; in bfloat16 the kernel's pair path)
SMOLVLM_TILE = (1, 12, 1024, 64)
CPU_SHAPES = [(8, 12, 197, 64), SMOLVLM_TILE, SMALL_CALL]
QUICK_SHAPES = [SMALL_CALL]
# Decode steps of SmolVLM2's decoder: 1 query, 9 heads on 3 kv heads, E = 64, at batch 1 and 32
# over KV caches of 128, 512 and 2048 tokens, without and with a key-padding mask (B, 1, 1, S).
DECODE = dict(heads=9, kv_heads=3, head_dim=64, batches=(1, 32), keys=(128, 512, 2048))
DECODE_QUICK = dict(heads=4, kv_heads=2, head_dim=64, batches=(2,), keys=(70,))
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
    d = DECODE_QUICK if quick else DECODE
    for batch in d["batches"]:
        for keys in d["keys"]:
            q, k, v, grad = _inputs(batch, d["heads"], d["kv_heads"], 1, keys, d["head_dim"], dtype, device)
            for masked in (False, True):
                mask = _key_padding(batch, keys, device) if masked else None
                case = (f"decode {batch}x{d['heads']}/{d['kv_heads']}x1x{keys}x{d['head_dim']}"
                        f"{' keypad' if masked else ''} {name}")
                results += _measure(case, _decode_implementations(q, k, v, mask), q, k, v, grad, device,
                                    lambda bwd, s=(batch, d["heads"], 1, keys, d["head_dim"]): attention_flops(*s, bwd),
                                    backward_too=False)
    return results


def _key_padding(batch: int, keys: int, device) -> torch.Tensor:
    """bool (B, 1, 1, S): batch entry b left-padded by b * S / (2 B) slots, as a batched decode is."""
    starts = torch.arange(batch) * keys // (2 * batch)
    return (torch.arange(keys)[None, :] >= starts[:, None])[:, None, None, :].to(device)


def _decode_implementations(q, k, v, mask):
    """vlmfast and every torch SDPA backend on the same call (enable_gqa, the same mask), and
    each torch backend also given K/V already repeated per query head (outside the timing, as
    transformers' repeat_kv; some backends lack GQA): the peer is the fastest of them all."""
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (t.detach().repeat_interleave(group, dim=1) for t in (k, v))
    impls = {"vlmfast": lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, mask, enable_gqa=True)}
    for name, backend in TORCH_BACKENDS.items():
        impls[name] = (backend, lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask, enable_gqa=True))
        impls[f"{name}+repeat_kv"] = (backend, lambda a, b, c: F.scaled_dot_product_attention(a, k_rep, v_rep, mask))
    return impls
