"""The C++ attention kernels (vlmfast/native/attention.py) against a float64 math reference.

out, lse, dq, dk, dv for float32 / float16 / bfloat16 under the tolerance rule of tests/tolerance.py
(the reference also run in the low precision: 2x its error for values, 3x for gradients), with odd
head dims and lengths, L != S, causal, GQA, broadcast biases, fully masked rows, strided q/k/v,
and both ways the backward splits its work.
"""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast.native import attention as native

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STRATEGIES = ["fused", "two_pass"]


def reference(q, k, v, scale, is_causal, bias):
    """softmax(scale q k^T + bias) v in q's dtype, and the log-sum-exp; rows with no key give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if is_causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    empty = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v, torch.logsumexp(scores, dim=-1)


def rotate(x, cos, sin):
    """Non-interleaved rotary of the first R = 2 * cos.shape[-1] dims of x (..., P, E), row p of
    the tables for position p: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = cos.shape[-1]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def reference_with_grads(q, k, v, grad, scale, is_causal, bias, dtype, rotary=None):
    """(out, lse, dq, dk, dv) of the reference computed in `dtype` (rotary applied to q and k
    first, the gradients taken through it). Rotated q and k are rounded to the inputs' dtype, as
    rotating with apply_rotary_emb and attending after would give them (the rounding passes the
    gradient through unchanged)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    q_in, k_in = leaves[0], leaves[1]
    if rotary is not None:
        q_in, k_in = (rotate(t, *rotary).to(q.dtype).to(dtype) for t in (q_in, k_in))
    out, lse = reference(q_in, k_in, leaves[2], scale, is_causal, bias)
    out.backward(grad.to(dtype))
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def random_inputs(batch, heads, kv_heads, length, keys, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    grad = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    return q, k, v, grad


def check_lse(lse, expected64):
    """lse is float32 whatever the inputs: float32's rule; -inf exactly where a row sees no key."""
    masked = expected64 == float("-inf")
    assert torch.equal(lse == float("-inf"), masked), "lse: -inf rows differ from the reference"
    assert_close(lse[~masked], expected64[~masked], name="lse")


def check_attention(q, k, v, grad, *, is_causal=False, bias=None, scale=None,
                    strategies=STRATEGIES, rotary=None):
    """Runs forward and every backward strategy and compares all five results."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = native.forward(q, k, v, scale=scale, is_causal=is_causal, bias=bias, rotary=rotary)
    exact = reference_with_grads(q, k, v, grad, scale, is_causal, bias, torch.float64, rotary)
    low = None
    if q.dtype != torch.float32:
        low = reference_with_grads(q, k, v, grad, scale, is_causal, bias, q.dtype, rotary)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, exact[0], low and low[0], name="out")
    check_lse(lse, exact[1])
    for strategy in strategies:
        grads = native._backward(grad, q, k, v, out, lse, scale=scale, is_causal=is_causal,
                                 bias=bias, strategy=strategy, rotary=rotary)
        for name, actual, index, like in zip(("dq", "dk", "dv"), grads, (2, 3, 4), (q, k, v)):
            assert actual.dtype == like.dtype and actual.shape == like.shape
            assert_close(actual, exact[index], low and low[index], factor=3.0,
                         name=f"{name} ({strategy})")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [32, 40, 64, 72, 80, 128])
def test_head_dims_and_dtypes(dtype, dim):
    causal = dim in (40, 80)
    check_attention(*random_inputs(2, 4, 2, 37, 71, dim, dtype, seed=dim), is_causal=causal)


@pytest.mark.parametrize("length,keys", [(1, 1), (1, 197), (7, 113), (113, 7), (197, 197), (113, 197)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_lengths(length, keys, is_causal):
    check_attention(*random_inputs(2, 3, 3, length, keys, 64, torch.float32, seed=length + keys),
                    is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_long_rows(dtype):
    check_attention(*random_inputs(1, 2, 1, 197, 197, 64, dtype, seed=3), is_causal=True)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_groups(kv_heads, is_causal):
    """dk, dv sum over the query heads of a group; causal limits follow the query position."""
    check_attention(*random_inputs(2, 8, kv_heads, 29, 83, 40, torch.float32, seed=kv_heads),
                    is_causal=is_causal)


def _bias(kind, batch, heads, length, keys, gen):
    if kind == "key_padding":  # (B, 1, 1, S): stride 0 over heads and rows
        keep = torch.rand(batch, 1, 1, keys, generator=gen) > 0.3
        keep[..., 0] = True
        small = torch.zeros(batch, 1, 1, keys).masked_fill(~keep, float("-inf"))
    elif kind == "full":
        small = torch.randn(batch, heads, length, keys, generator=gen)
    elif kind == "padded_tail":  # (B, 1, 1, S) masking whole 64-key blocks at the end
        small = torch.zeros(batch, 1, 1, keys)
        for i in range(batch):
            small[i, ..., 10 + 60 * i:] = float("-inf")
    elif kind == "per_row":  # (B, H, L, 1): stride 0 over keys
        small = torch.randn(batch, heads, length, 1, generator=gen)
    elif kind == "transposed":  # a (S, L) tensor seen as (L, S): key stride L
        small = torch.randn(keys, length, generator=gen).t()
    else:  # (L, S), shared by every batch and head
        small = torch.randn(length, keys, generator=gen)
        small[:, 1::3] = float("-inf")
    return small.expand(batch, heads, length, keys)


@pytest.mark.parametrize("kind", ["key_padding", "padded_tail", "full", "rows_keys", "per_row",
                                  "transposed"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_bias(kind, is_causal):
    q, k, v, grad = random_inputs(2, 4, 2, 45, 131, 72, torch.float32, seed=11)
    bias = _bias(kind, 2, 4, 45, 131, torch.Generator().manual_seed(5))
    check_attention(q, k, v, grad, is_causal=is_causal, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_low_precision(dtype):
    q, k, v, grad = random_inputs(2, 2, 2, 33, 90, 64, dtype, seed=12)
    check_attention(q, k, v, grad, bias=_bias("full", 2, 2, 33, 90, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    """A batch whose keys are all padded, and under causal a row whose only key is masked:
    out = 0, lse = -inf, zero gradients, no NaN anywhere."""
    q, k, v, grad = random_inputs(2, 2, 1, 19, 70, 32, dtype, seed=4)
    bias = torch.zeros(2, 1, 1, 70)
    bias[1] = float("-inf")
    bias[0, ..., 0] = float("-inf")  # causal row 0 of batch 0 sees only key 0
    bias = bias.expand(2, 2, 19, 70)
    out, lse = check_attention(q, k, v, grad, is_causal=True, bias=bias)
    assert (out[1] == 0).all() and (out[0, :, 0] == 0).all()
    assert (lse[1] == float("-inf")).all() and (lse[0, :, 0] == float("-inf")).all()
    for strategy in STRATEGIES:
        dq, dk, dv = native._backward(grad, q, k, v, out, lse, scale=0.2, is_causal=True,
                                      bias=bias, strategy=strategy)
        assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
        assert (dq[0, :, 0] == 0).all()


def test_no_keys_and_no_queries():
    q, k, v, grad = random_inputs(1, 2, 2, 5, 0, 16, torch.float32)
    out, lse = native.forward(q, k, v, scale=0.25, is_causal=False, bias=None)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = native.backward(grad, q, k, v, out, lse, scale=0.25, is_causal=False, bias=None)
    assert (dq == 0).all() and dk.shape == k.shape
    q, k, v, grad = random_inputs(1, 2, 2, 0, 9, 16, torch.float32)
    out, lse = native.forward(q, k, v, scale=0.25, is_causal=False, bias=None)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    dq, dk, dv = native.backward(grad, q, k, v, out, lse, scale=0.25, is_causal=False, bias=None)
    assert (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_from_fused_qkv(dtype):
    """q, k, v as slices of one (B, L, 3, H, E) projection: strides (L*3*H*E, E, 3*H*E, 1)."""
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 50, 3, 4, 80, generator=gen).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    grad = torch.randn(2, 4, 50, 80, generator=gen).to(dtype)
    check_attention(q, k, v, grad, is_causal=True)


def test_head_dim_not_contiguous():
    q, k, v, grad = random_inputs(1, 2, 2, 21, 21, 48, torch.float32, seed=9)
    k_strided = torch.randn(1, 2, 21, 96)[..., ::2]
    k_strided.copy_(k)
    check_attention(q, k_strided, v, grad.transpose(-1, -2).contiguous().transpose(-1, -2))


def test_scale_and_auto_strategy():
    q, k, v, grad = random_inputs(3, 6, 3, 13, 150, 64, torch.float32, seed=2)
    check_attention(q, k, v, grad, scale=0.37, strategies=["auto"])


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("thread_count", [1, 3, 8])
def test_decode_key_splits(threads, thread_count):
    """Fewer row blocks than threads: the keys are split between threads and merged."""
    threads(thread_count)
    q, k, v, grad = random_inputs(1, 4, 1, 1, 1000, 64, torch.float32, seed=thread_count)
    check_attention(q, k, v, grad)
    q, k, v, grad = random_inputs(1, 8, 2, 3, 517, 72, torch.bfloat16, seed=1)
    check_attention(q, k, v, grad, is_causal=True)


@pytest.mark.parametrize("dim", [1, 3, 256])
def test_extreme_head_dims(dim):
    check_attention(*random_inputs(1, 2, 1, 20, 70, dim, torch.float32, seed=dim), is_causal=True)


def test_long_keys_beyond_the_tile_cache(threads):
    """Enough pairs for one job per (batch, kv head) but too many keys to keep every packed tile:
    the forward repacks them per row block instead."""
    threads(1)
    q, k, v, grad = random_inputs(1, 4, 4, 80, 17000, 128, torch.float32, seed=5)
    check_attention(q, k, v, grad, strategies=["fused"])


def test_bad_inputs():
    q, k, v, _ = random_inputs(1, 4, 2, 5, 6, 16, torch.float32)
    with pytest.raises(TypeError, match="q, k, v: expected one of float32"):
        native.forward(q, k.double(), v, scale=1.0, is_causal=False, bias=None)
    with pytest.raises(ValueError, match=r"k, v: expected \(1, Hkv, S, 16\)"):
        native.forward(q, k[..., :8], v[..., :8], scale=1.0, is_causal=False, bias=None)
    with pytest.raises(ValueError, match=r"q, k, v: expected \(B, H, L, E\) and \(B, Hkv, S, E\)"):
        native.forward(q, k, v[:, :, :3], scale=1.0, is_causal=False, bias=None)
    with pytest.raises(ValueError, match="q, k, v: expected CPU tensors"):
        native.forward(q.to("meta"), k, v, scale=1.0, is_causal=False, bias=None)
    with pytest.raises(ValueError, match="k: expected a head count dividing 4"):
        native.forward(q, k[:, :1].expand(1, 3, 6, 16), v[:, :1].expand(1, 3, 6, 16), scale=1.0,
                       is_causal=False, bias=None)
    with pytest.raises(ValueError, match=r"bias: expected float32 \(1, 4, 5, 6\)"):
        native.forward(q, k, v, scale=1.0, is_causal=False, bias=torch.zeros(1, 4, 5, 6).half())
    with pytest.raises(ValueError, match=r"lse: expected \(1, 4, 5\)"):
        native.backward(q, q, k, v, q, torch.zeros(1, 4), scale=1.0, is_causal=False, bias=None)


# ----------------------------------------------------------------------------- rotary in the kernel


def rotary_tables(positions, half, seed=0):
    """float32 (positions, half) cos and sin of random angles (any angles: the kernel must not
    assume a frequency layout)."""
    angles = torch.rand(positions, half, generator=torch.Generator().manual_seed(seed)) * 6.3
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "heads,kv_heads,length,dim,half,is_causal",
    [
        (4, 4, 197, 64, 32, False),  # full rotary, R = E
        (6, 3, 113, 40, 8, True),    # partial R = 16 < E = 40, GQA, causal
        (9, 3, 70, 64, 16, True),    # SmolVLM2-like GQA 3 kv heads, partial
        (2, 1, 37, 80, 40, False),   # E = 80 (padded to 96 inside)
    ],
)
def test_rotary_inside_the_kernel(dtype, heads, kv_heads, length, dim, half, is_causal):
    """out, lse, dq, dk, dv with the tables given to the kernel == rotate q, k then attend."""
    q, k, v, grad = random_inputs(2, heads, kv_heads, length, length, dim, dtype, seed=heads)
    check_attention(q, k, v, grad, is_causal=is_causal, rotary=rotary_tables(length, half, dim))


def test_rotary_equals_apply_then_attend():
    """The same kernel given rotated inputs (vlmfast.ops.apply_rotary_emb first, as the op layer
    does for learnable tables): equal up to float32 rounding, values and gradients."""
    from vlmfast.ops import apply_rotary_emb

    q, k, v, grad = random_inputs(1, 6, 2, 97, 97, 64, torch.float32, seed=3)
    cos, sin = rotary_tables(97, 24, seed=4)
    bias = torch.zeros(1, 1, 1, 97).masked_fill(torch.arange(97) < 5, float("-inf")).expand(1, 6, 97, 97)
    fused_out, fused_lse = native.forward(q, k, v, scale=0.125, is_causal=True, bias=bias, rotary=(cos, sin))
    q_rot, k_rot = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    out, lse = native.forward(q_rot, k_rot, v, scale=0.125, is_causal=True, bias=bias)
    torch.testing.assert_close(fused_out, out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused_lse, lse, atol=2e-5, rtol=1e-4)
    fused = native.backward(grad, q, k, v, fused_out, fused_lse, scale=0.125, is_causal=True,
                            bias=bias, rotary=(cos, sin))
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    rotated = [apply_rotary_emb(t, cos, sin) for t in leaves]
    dq_rot, dk_rot, dv = native.backward(grad, *rotated, v, out, lse, scale=0.125, is_causal=True,
                                         bias=bias)
    torch.autograd.backward(rotated, [dq_rot, dk_rot])  # through the rotation's transpose
    for name, actual, expected in zip(("dq", "dk", "dv"), fused, (leaves[0].grad, leaves[1].grad, dv)):
        torch.testing.assert_close(actual, expected, atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rotary_in_16_bits_is_apply_then_attend_bit_for_bit(dtype):
    """In 16 bits the kernel rounds the rotated q and k to their dtype, as apply_rotary_emb's
    output is rounded: the forward gives the very bits of rotating first and attending after
    (bfloat16: on the pair path where the CPU has it)."""
    from vlmfast.ops import apply_rotary_emb

    q, k, v, _ = random_inputs(1, 6, 2, 97, 97, 64, dtype, seed=3)
    cos, sin = rotary_tables(97, 24, seed=4)
    fused_out, fused_lse = native.forward(q, k, v, scale=0.125, is_causal=True, rotary=(cos, sin))
    out, lse = native.forward(apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin), v, scale=0.125,
                              is_causal=True)
    assert torch.equal(fused_out, out) and torch.equal(fused_lse, lse)


def test_rotary_tables_with_extra_rows_and_strides():
    """Tables longer than the sequence (a precomputed cache sliced by position) and views with a
    row stride: only the first max(L, S) rows are read."""
    q, k, v, grad = random_inputs(1, 4, 2, 50, 50, 32, torch.float32, seed=6)
    cos_all, sin_all = rotary_tables(300, 16, seed=7)
    both = torch.cat((cos_all, sin_all), dim=1)  # (300, 32): cos and sin views, row stride 32
    check_attention(q, k, v, grad, rotary=(both[:, :16], both[:, 16:]), strategies=["auto"])


def test_rotary_bad_tables():
    q, k, v, _ = random_inputs(1, 4, 2, 5, 5, 16, torch.float32)
    cos, sin = rotary_tables(5, 4)
    with pytest.raises(ValueError, match=r"rotary cos: expected float32 \(P, R/2\)"):
        native.forward(q, k, v, scale=1.0, is_causal=False, rotary=(cos.double(), sin))
    with pytest.raises(ValueError, match=r"rotary sin: expected float32 \(P, R/2\)"):
        native.forward(q, k, v, scale=1.0, is_causal=False, rotary=(cos, sin[:, :2]))
    with pytest.raises(ValueError, match=r"P >= max\(L, S\) = 5"):
        native.forward(q, k, v, scale=1.0, is_causal=False, rotary=(cos[:4], sin[:4]))
    wide = rotary_tables(5, 9)
    with pytest.raises(ValueError, match=r"1 <= R/2 <= E/2 = 8"):
        native.backward(q, q, k, v, q, torch.zeros(1, 4, 5), scale=1.0, is_causal=False,
                        rotary=wide)
