"""The C++ varlen forward (every packed sequence in one call, vlmfast/native/attention.py's
launch_varlen_forward) against a float64 reference run on each sequence alone: out and lse, with
odd lengths, empty sequences, sequences shorter than a 64-key tile and longer than one, GQA,
causal, rotary tables and q, k, v as strided views of one fused qkv projection."""

import pytest
import torch

from tests.native.test_attention_cpu import check_lse, reference, rotate
from tests.tolerance import assert_close
from vlmfast.native import attention as native

# Qwen2.5-VL's window segments are <= 64 tokens: shorter than a tile, one tile, and edge windows
LENGTHS = [[1], [5, 17, 1, 30], [64, 48, 0, 64, 36, 7, 64], [65, 130, 3], [200]]


def packed(lengths, heads, kv_heads, dim, dtype, seed):
    """q, k, v (T, *, E) as views of one (T, H + 2 Hkv, E) projection (strided tokens), cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def per_sequence(q, k, v, cu, scale, is_causal, rotary):
    """(out (T, H, E), lse (H, T)) in float64, each sequence alone (rotated q and k rounded to the
    inputs' dtype, as the kernel and apply_rotary_emb round them)."""
    outs, lses = [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[start:end].double().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if rotary is not None:
            tables = tuple(t[start:end].double() for t in rotary)
            qs, ks = (rotate(t, *tables).to(q.dtype).double() for t in (qs, ks))
        out, lse = reference(qs, ks, vs, scale, is_causal, None)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def check_varlen(lengths, heads, kv_heads, dim, dtype, *, is_causal=False, rotary_half=0, seed=0):
    q, k, v, cu = packed(lengths, heads, kv_heads, dim, dtype, seed)
    tables = None
    if rotary_half:
        angles = torch.rand(q.shape[0], rotary_half, generator=torch.Generator().manual_seed(seed)) * 6.28
        tables = (angles.cos(), angles.sin())
    scale = dim ** -0.5
    out, lse = native.launch_varlen_forward(q, k, v, cu, scale, is_causal, tables)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (heads, q.shape[0])
    exact_out, exact_lse = per_sequence(q, k, v, cu, scale, is_causal, tables)
    low = None if dtype == torch.float32 else _low_precision(q, k, v, cu, scale, is_causal, tables, dtype)
    assert_close(out, exact_out, low, name="out")
    check_lse(lse, exact_lse)


def _low_precision(q, k, v, cu, scale, is_causal, tables, dtype):
    """The reference run in the inputs' low precision (the tolerance rule's yardstick)."""
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if tables is not None:
            qs, ks = rotate(qs, *(t[start:end] for t in tables)), rotate(ks, *(t[start:end] for t in tables))
        outs.append(reference(qs, ks, vs, scale, is_causal, None)[0][0].transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequences_of_every_length(lengths, dtype):
    check_varlen(lengths, 4, 4, 80, dtype, rotary_half=20, seed=len(lengths))


@pytest.mark.parametrize("thread_count", [1, 2, 3])
@pytest.mark.parametrize("heads, kv_heads", [(16, 16), (2, 1), (6, 2)])
def test_threads_and_gqa(threads, thread_count, heads, kv_heads):
    """Many heads (one job per head and sequence) and few (jobs per row block), on 1 to 3 threads."""
    threads(thread_count)
    check_varlen([64, 37, 64, 16, 129], heads, kv_heads, 40, torch.float32, rotary_half=10, seed=heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causal(dtype):
    check_varlen([23, 0, 9, 70], 4, 2, 72, dtype, is_causal=True, seed=3)


def test_equals_the_op_with_gradients():
    """The op's forward (this kernel) and backward (per sequence) agree with the reference op."""
    from vlmfast import ops
    from vlmfast.ops import reference as ops_reference

    q, k, v, cu = packed([64, 19, 64, 1], 4, 4, 48, torch.float32, 5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention_varlen(*leaves, cu, 64)
    out.square().sum().backward()
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = ops_reference.attention_varlen(*exact, cu, 64, False, 48 ** -0.5, None)
    expected.square().sum().backward()
    assert_close(out.detach(), expected.detach(), name="out")
    for name, a, b in zip(("dq", "dk", "dv"), leaves, exact):
        assert_close(a.grad, b.grad, factor=3.0, name=name)
