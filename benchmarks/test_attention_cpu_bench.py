"""pytest-benchmark: the C++ attention kernels (vlmfast/native/attention.py) vs torch SDPA on the CPU.

ViT-B/16 at batch 8, (B, H, L, E) = (8, 12, 197, 64), float32 and bfloat16, forward and
forward+backward; and one decode step with GQA (1 query, 2048 keys, 8 heads on 2 kv heads).
Each group holds vlmfast and its torch peer, measured in the same run:

    pytest benchmarks/test_attention_cpu_bench.py --benchmark-only --benchmark-enable
"""

import pytest
import torch
import torch.nn.functional as F

from vlmfast.native import attention as native

SHAPE = (8, 12, 197, 64)
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(dtype, shape=SHAPE, kv_heads=None, keys=None):
    batch, heads, length, dim = shape
    gen = torch.Generator().manual_seed(0)
    kv_shape = (batch, kv_heads or heads, keys or length, dim)
    q = torch.randn(shape, generator=gen).to(dtype)
    k = torch.randn(kv_shape, generator=gen).to(dtype)
    v = torch.randn(kv_shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    return q, k, v, grad


def _vlmfast_forward_backward(q, k, v, grad):
    scale = q.shape[-1] ** -0.5
    out, lse = native.forward(q, k, v, scale=scale, is_causal=False, bias=None)
    return native.backward(grad, q, k, v, out, lse, scale=scale, is_causal=False, bias=None)


def _sdpa_forward_backward(q, k, v, grad):
    out = F.scaled_dot_product_attention(q, k, v)
    return torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_vlmfast(benchmark, dtype):
    benchmark.group = f"attention-cpu-forward-{dtype}"
    q, k, v, _ = _inputs(dtype)
    out, _ = benchmark(native.forward, q, k, v, scale=0.125, is_causal=False, bias=None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_torch_sdpa(benchmark, dtype):
    benchmark.group = f"attention-cpu-forward-{dtype}"
    q, k, v, _ = _inputs(dtype)
    benchmark(F.scaled_dot_product_attention, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_vlmfast(benchmark, dtype):
    benchmark.group = f"attention-cpu-forward-backward-{dtype}"
    q, k, v, grad = _inputs(dtype)
    grads = benchmark(_vlmfast_forward_backward, q, k, v, grad)
    expected = _sdpa_forward_backward(*(t.float().requires_grad_() for t in (q, k, v)), grad.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for actual, peer in zip(grads, expected):
        torch.testing.assert_close(actual.float(), peer, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_torch_sdpa(benchmark, dtype):
    benchmark.group = f"attention-cpu-forward-backward-{dtype}"
    q, k, v, grad = _inputs(dtype)
    benchmark(_sdpa_forward_backward, *(t.requires_grad_() for t in (q, k, v)), grad)


DECODE = dict(shape=(1, 8, 1, 64), kv_heads=2, keys=2048)


def test_decode_vlmfast(benchmark):
    benchmark.group = "attention-cpu-decode-gqa-float32"
    q, k, v, _ = _inputs(torch.float32, **DECODE)
    out, _ = benchmark(native.forward, q, k, v, scale=0.125, is_causal=False, bias=None)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_torch_sdpa(benchmark):
    benchmark.group = "attention-cpu-decode-gqa-float32"
    q, k, v, _ = _inputs(torch.float32, **DECODE)
    benchmark(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
