"""pytest-benchmark: the C++ attention kernels (vlmfast/native/attention.py) vs torch SDPA on the CPU.

ViT-B/16 at batch 8, (B, H, L, E) = (8, 12, 197, 64), float32 and bfloat16, forward and
forward+backward; and decode steps with GQA through the public op (see DECODE_CASES).
Each group holds vlmfast and its torch peer, measured in the same run:

    pytest benchmarks/test_attention_cpu_bench.py --benchmark-only --benchmark-enable
"""

import pytest
import torch
import torch.nn.functional as F

from vlmfast import ops
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


# Decode steps through the public op (what generation calls: its per-call overhead is part of
# the measure), no gradient: SmolVLM2's 9 query heads on 3 kv heads, E = 64, one query, at batch
# 1 and 32 over 128 / 512 / 2048 cached keys, without and with a key-padding mask (B, 1, 1, S).
# The peer is torch's SDPA on the same call (enable_gqa=True, the same mask).
DECODE_CASES = [(batch, keys, masked) for batch in (1, 32) for keys in (128, 512, 2048) for masked in (False, True)]


def _decode_inputs(dtype, batch, keys, masked):
    q, k, v, _ = _inputs(dtype, shape=(batch, 9, 1, 64), kv_heads=3, keys=keys)
    mask = None
    if masked:  # left padding: entry b starts at slot b * S / (2 B)
        starts = torch.arange(batch) * keys // (2 * batch)
        mask = (torch.arange(keys)[None, :] >= starts[:, None])[:, None, None, :]
    return q, k, v, mask


def _decode_id(case):
    batch, keys, masked = case
    return f"B{batch}-S{keys}" + ("-keypad" if masked else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_decode_vlmfast(benchmark, case, dtype):
    benchmark.group = f"attention-cpu-decode-{_decode_id(case)}-{dtype}"
    q, k, v, mask = _decode_inputs(dtype, *case)
    with torch.no_grad():
        out = benchmark(ops.scaled_dot_product_attention, q, k, v, mask, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_decode_torch_sdpa(benchmark, case, dtype):
    benchmark.group = f"attention-cpu-decode-{_decode_id(case)}-{dtype}"
    q, k, v, mask = _decode_inputs(dtype, *case)
    with torch.no_grad():
        benchmark(F.scaled_dot_product_attention, q, k, v, mask, enable_gqa=True)
