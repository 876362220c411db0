"""vlmfast attention against every torch SDPA backend, forward and forward+backward.

    from benchmarks.attention import run
    rows = run(torch.device("cuda"), torch.bfloat16)     # the TARGETS.md shapes (H100/H200)
    rows = run(torch.device("cpu"), torch.float32)       # ViT-B/16 batch 8 on the CPU

    python -m benchmarks.attention [--device cuda] [--dtype bfloat16] [--quick] [--json out.jsonl]

Each row: shape, pass ("fwd" or "fwd+bwd"), impl ("vlmfast", "vlmfast+rotary", "torch-math",
"torch-efficient", "torch-flash", "torch-cudnn"), ms (median: CUDA events via
triton.testing.do_bench on a GPU, wall clock on the CPU), TFLOP/s (4 B H L S E for the forward,
2.5x that more for the backward) and `ratio` = the best torch backend's ms / this row's ms.
Backends that fail on the shape (e.g. cuDNN without support, flash with E = 72) are skipped.
"""

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmfast import ops
from vlmfast.bench.timing import time_ms

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


def _measure(shape_name, impls, q, k, v, grad, device, flops, backward_too=True):
    rows = []
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
                    ms = time_ms(fn, device)
            except (RuntimeError, NotImplementedError, ValueError):
                continue  # this torch backend does not support the shape, dtype or device
            work = flops(pass_name == "fwd+bwd")
            rows.append({"shape": shape_name, "pass": pass_name, "impl": name, "ms": ms,
                         "tflops": work / ms / 1e9})
    for pass_name in ("fwd", "fwd+bwd"):
        peers = [r["ms"] for r in rows if r["pass"] == pass_name and r["impl"].startswith("torch")]
        for r in rows:
            if r["pass"] == pass_name:
                r["best_torch_ms"] = min(peers) if peers else None
                r["ratio"] = min(peers) / r["ms"] if peers else None
    return rows


def run(device, dtype=None, *, quick: bool = False) -> list[dict]:
    """Rows as described in the module docstring, for every shape of the device."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    rows = []
    for batch, heads, length, head_dim in shapes:
        q, k, v, grad = _inputs(batch, heads, heads, length, length, head_dim, dtype, device)
        angles = torch.rand(length, head_dim // 2, device=device) * 6.28
        rotary = (angles.cos(), angles.sin())
        name = f"{batch}x{heads}x{length}x{head_dim}"
        rows += _measure(name, _implementations(q, k, v, rotary), q, k, v, grad, device,
                         lambda bwd, s=(batch, heads, length, length, head_dim): attention_flops(*s, bwd))
    d = DECODE if not quick else dict(batch=2, heads=4, kv_heads=2, keys=70, head_dim=64)
    q, k, v, grad = _inputs(d["batch"], d["heads"], d["kv_heads"], 1, d["keys"], d["head_dim"], dtype, device)
    name = f"decode {d['batch']}x{d['heads']}/{d['kv_heads']}x1x{d['keys']}x{d['head_dim']}"
    rows += _measure(name, _implementations(q, k, v, None), q, k, v, grad, device,
                     lambda bwd: attention_flops(d["batch"], d["heads"], 1, d["keys"], d["head_dim"], bwd),
                     backward_too=False)
    for r in rows:
        r.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 dtype=str(dtype).removeprefix("torch."))
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["shape", "pass", "impl", "ms", "TFLOP/s", "best torch / this"]
    lines = [header] + [[r["shape"], r["pass"], r["impl"], f"{r['ms']:.3f}", f"{r['tflops']:.3g}",
                         f"{r['ratio']:.2f}x" if r["ratio"] else ""] for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="append the rows as JSON lines")
    args = parser.parse_args(argv)
    rows = run(args.device, getattr(torch, args.dtype) if args.dtype else None, quick=args.quick)
    print(format_table(rows))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
