"""scaled_dot_product_attention and attention_varlen: every backend against the float64 reference
and torch's SDPA, values and gradients; fully-masked rows, rotary, GQA, decode, the op contract
(opcheck, torch.compile) and bad input."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import BACKENDS
from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shapes above ~70 are too slow for Triton's CPU interpreter: run them on the other backends.
NOT_INTERPRETED = [p for p in BACKENDS if p[0] != "triton" or p[1] != "cpu"]


def _randn(*shape, dtype=torch.float32, device="cpu", generator=None):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def _mask(kind, batch, heads, length, keys, generator):
    """Masks of several broadcast shapes; each row keeps at least one key."""
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, S): the last keys of each batch entry are padding
        valid = torch.randint(1, keys + 1, (batch,), generator=generator)
        return (torch.arange(keys)[None, :] < valid[:, None])[:, None, None, :]
    if kind == "bool_full":  # (B, H, L, S)
        mask = torch.rand(batch, heads, length, keys, generator=generator) > 0.3
        mask[..., 0] = True
        return mask
    if kind == "bool_heads":  # (H, L, S), broadcast over the batch
        mask = torch.rand(heads, length, keys, generator=generator) > 0.5
        mask[..., -1] = True
        return mask
    if kind == "float":  # (B, 1, L, S) additive, with some -inf
        mask = torch.randn(batch, 1, length, keys, generator=generator)
        drop = torch.rand(batch, 1, length, keys, generator=generator) > 0.8
        drop[..., 0] = False
        return mask.masked_fill(drop, float("-inf"))
    raise AssertionError(kind)


def _run(fn, q, k, v, grad, dtype):
    """(out, dq, dk, dv) of fn on copies of q, k, v in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_all(fused, exact, low):
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert_close(fused[i], exact[i], low[i], factor=2.0 if i == 0 else 3.0, name=name)


def _compare_with_reference(q, k, v, grad, mask=None, **options):
    fused = _run(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, mask, **options), q, k, v, grad, q.dtype)
    ref_mask = lambda dtype: mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)  # noqa: E731
    exact = _run(lambda a, b, c: reference.scaled_dot_product_attention(a, b, c, ref_mask(torch.float64), **options),
                 q, k, v, grad, torch.float64)
    low = _run(lambda a, b, c: reference.scaled_dot_product_attention(a, b, c, ref_mask(q.dtype), **options),
               q, k, v, grad, q.dtype)
    _check_all(fused, exact, low)


CASES = [
    # (B, H, Hkv, L, S, E, is_causal, mask, scale)
    (2, 3, 3, 37, 37, 64, False, None, None),
    (1, 4, 2, 33, 45, 40, True, None, None),          # causal with L < S, GQA, E 40
    (3, 2, 2, 45, 33, 72, True, "key_padding", None),  # causal with L > S plus key padding, E 72
    (1, 2, 2, 1, 50, 80, False, "bool_full", 0.3),    # one query (decode), E 80, explicit scale
    (2, 4, 1, 3, 70, 64, False, "float", None),        # a few queries, GQA 4:1, float mask
    (1, 2, 2, 20, 20, 32, False, "bool_heads", None),  # (H, L, S) mask broadcast over B
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-causal{int(c[6])}-{c[7]}")
def test_sdpa_matches_reference(backend, dtype, case):
    batch, heads, kv_heads, length, keys, head_dim, is_causal, mask_kind, scale = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))  # hash() of str varies by run
    q = _randn(batch, heads, length, head_dim, dtype=dtype, device=backend.device, generator=g)
    k = _randn(batch, kv_heads, keys, head_dim, dtype=dtype, device=backend.device, generator=g)
    v = _randn(batch, kv_heads, keys, head_dim, dtype=dtype, device=backend.device, generator=g)
    grad = _randn(batch, heads, length, head_dim, device=backend.device, generator=g)
    mask = _mask(mask_kind, batch, heads, length, keys, g)
    mask = None if mask is None else mask.to(backend.device)
    _compare_with_reference(q, k, v, grad, mask, is_causal=is_causal, scale=scale,
                            enable_gqa=kv_heads != heads)


@pytest.mark.parametrize("backend", NOT_INTERPRETED, indirect=True, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, keys, is_causal", [(113, 113, True), (197, 197, False), (197, 113, True)])
def test_sdpa_long_sequences(backend, dtype, length, keys, is_causal):
    g = torch.Generator().manual_seed(length * 1000 + keys)
    q = _randn(3, 4, length, 64, dtype=dtype, device=backend.device, generator=g)
    k = _randn(3, 2, keys, 64, dtype=dtype, device=backend.device, generator=g)
    v = _randn(3, 2, keys, 64, dtype=dtype, device=backend.device, generator=g)
    grad = _randn(3, 4, length, 64, device=backend.device, generator=g)
    mask = _mask("key_padding", 3, 4, length, keys, g).to(backend.device)
    _compare_with_reference(q, k, v, grad, mask, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize(
    "mask_kind, is_causal, enable_gqa, scale",
    [(None, False, False, None), ("key_padding", False, True, 0.2), ("float", False, False, None),
     (None, True, True, None), ("bool_full", False, False, 1.0)],
)
def test_sdpa_matches_torch(backend, mask_kind, is_causal, enable_gqa, scale):
    g = torch.Generator().manual_seed(7)
    heads, kv_heads = 4, 2 if enable_gqa else 4
    q = _randn(2, heads, 29, 40, device=backend.device, generator=g)
    k = _randn(2, kv_heads, 29 if is_causal else 41, 40, device=backend.device, generator=g)
    v = torch.randn_like(k)
    mask = _mask(mask_kind, 2, heads, 29, k.shape[2], g)
    mask = None if mask is None else mask.to(backend.device)
    args = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.scaled_dot_product_attention(*ours, **args)
    expected = F.scaled_dot_product_attention(*theirs, **args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    F.scaled_dot_product_attention(*exact, **dict(args, attn_mask=mask64)).backward(grad.double())
    for name, a, b, e in zip(("dq", "dk", "dv"), ours, theirs, exact):
        # Gradients: as close to float64 as torch's own float32 gradients are (sharp softmaxes
        # at scale 1 leave both some 1e-5 off), within the 3x factor of the tolerance rule.
        ours_error = (a.grad.double() - e.grad).abs().max().item()
        torch_error = (b.grad.double() - e.grad).abs().max().item()
        assert ours_error <= 3 * torch_error + 1e-5 * max(1.0, e.grad.abs().max().item()), name


@pytest.mark.parametrize("head_dim", [128, 256])
def test_sdpa_large_head_dims(backend, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (_randn(1, 2, 19, head_dim, device=backend.device, generator=g) for _ in range(3))
    grad = _randn(1, 2, 19, head_dim, device=backend.device, generator=g)
    _compare_with_reference(q, k, v, grad, is_causal=True)


# --------------------------------------------------------------------------- fully masked rows


def test_fully_masked_rows_give_zeros(backend):
    q = _randn(2, 2, 9, 32, device=backend.device)
    k = _randn(2, 2, 21, 32, device=backend.device)
    v = _randn(2, 2, 21, 32, device=backend.device)
    mask = torch.ones(2, 1, 9, 21, dtype=torch.bool, device=backend.device)
    mask[0] = False            # a batch entry with every key padded
    mask[1, :, 3] = False       # one query row masked out
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.scaled_dot_product_attention(*leaves, mask)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, 3] == 0).all()
    out.backward(torch.randn_like(out))
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert (leaves[0].grad[0] == 0).all() and (leaves[0].grad[1, :, 3] == 0).all()
    assert (leaves[1].grad[0] == 0).all() and (leaves[2].grad[0] == 0).all()
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
    assert_close(out.detach(), expected)


def test_causal_with_mask_masking_the_first_key(backend):
    """is_causal and a mask together (torch refuses; we apply both): row 0 then sees nothing."""
    q = _randn(1, 2, 12, 32, device=backend.device)
    k, v = _randn(1, 2, 12, 32, device=backend.device), _randn(1, 2, 12, 32, device=backend.device)
    mask = torch.ones(12, dtype=torch.bool, device=backend.device)
    mask[0] = False
    out = ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask, is_causal=True)
    assert (out[:, :, 0] == 0).all()
    assert_close(out, expected)


# --------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, length, head_dim, half, is_causal",
                         [(2, 2, 33, 64, 32, False), (4, 2, 21, 40, 20, True), (2, 1, 17, 80, 16, False)])
def test_rotary_equals_apply_then_attend(backend, dtype, heads, kv_heads, length, head_dim, half, is_causal):
    g = torch.Generator().manual_seed(length)
    q = _randn(2, heads, length, head_dim, dtype=dtype, device=backend.device, generator=g)
    k = _randn(2, kv_heads, length, head_dim, dtype=dtype, device=backend.device, generator=g)
    v = _randn(2, kv_heads, length, head_dim, dtype=dtype, device=backend.device, generator=g)
    grad = _randn(2, heads, length, head_dim, device=backend.device, generator=g)
    angles = torch.rand(length, half, generator=g).to(backend.device) * 6.28
    cos, sin = angles.cos(), angles.sin()
    options = dict(is_causal=is_causal, enable_gqa=heads != kv_heads)
    fused = _run(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, rotary=(cos, sin), **options),
                 q, k, v, grad, dtype)

    def unfused(a, b, c):
        tables = (cos.to(a.dtype), sin.to(a.dtype)) if a.dtype == torch.float64 else (cos, sin)
        return reference.scaled_dot_product_attention(a, b, c, rotary=tables, **options)

    _check_all(fused, _run(unfused, q, k, v, grad, torch.float64), _run(unfused, q, k, v, grad, dtype))


def test_rotary_tables_that_require_grad_get_it(backend):
    q, k, v = (_randn(1, 2, 11, 32, device=backend.device) for _ in range(3))
    angles = torch.rand(11, 16, device=backend.device)
    cos, sin = angles.cos().requires_grad_(), angles.sin().requires_grad_()
    ops.scaled_dot_product_attention(q, k, v, rotary=(cos, sin)).sum().backward()
    cos64, sin64 = angles.double().cos().requires_grad_(), angles.double().sin().requires_grad_()
    reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), rotary=(cos64, sin64)).sum().backward()
    torch.testing.assert_close(cos.grad.double(), cos64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sin.grad.double(), sin64.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- varlen


def _packed(lengths, heads, kv_heads, head_dim, dtype, device, generator):
    total = sum(lengths)
    q = _randn(total, heads, head_dim, dtype=dtype, device=device, generator=generator)
    k = _randn(total, kv_heads, head_dim, dtype=dtype, device=device, generator=generator)
    v = _randn(total, kv_heads, head_dim, dtype=dtype, device=device, generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, heads, kv_heads, head_dim, is_causal, rotary",
                         [([5, 17, 1, 30], 2, 2, 64, False, False),
                          ([23, 0, 9], 4, 2, 40, True, False),
                          ([12, 19], 2, 1, 72, True, True)])
def test_varlen_equals_sdpa_per_sequence(backend, dtype, lengths, heads, kv_heads, head_dim, is_causal, rotary):
    g = torch.Generator().manual_seed(sum(lengths))
    q, k, v, cu = _packed(lengths, heads, kv_heads, head_dim, dtype, backend.device, g)
    grad = _randn(*q.shape, device=backend.device, generator=g)
    tables = None
    if rotary:
        angles = torch.rand(q.shape[0], head_dim // 2, generator=g).to(backend.device) * 6.28
        tables = (angles.cos(), angles.sin())

    def fused(a, b, c):
        return ops.attention_varlen(a, b, c, cu, max(lengths), is_causal=is_causal, rotary=tables)

    def per_sequence(a, b, c):
        if tables is not None:
            t = tables if a.dtype != torch.float64 else tuple(x.double() for x in tables)
            a, b = reference.apply_rotary_emb(a, *t, seq_dim=0), reference.apply_rotary_emb(b, *t, seq_dim=0)
        pieces = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (x[start:end].transpose(0, 1) for x in (a, b, c))
            pieces.append(reference.scaled_dot_product_attention(
                qs, ks, vs, is_causal=is_causal, enable_gqa=True).transpose(0, 1))
        return torch.cat(pieces)

    _check_all(_run(fused, q, k, v, grad, dtype), _run(per_sequence, q, k, v, grad, torch.float64),
               _run(per_sequence, q, k, v, grad, dtype))


def test_varlen_matches_torch_sdpa(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v, cu = _packed([7, 13], 2, 2, 32, torch.float32, backend.device, g)
    out = ops.attention_varlen(q, k, v, cu, 13, scale=0.25)
    for start, end in [(0, 7), (7, 20)]:
        expected = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), scale=0.25)
        torch.testing.assert_close(out[start:end], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- other paths


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p[0] == "triton"], indirect=True,
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_decode_uses_split_kv(backend):
    from vlmfast.kernels import attention as triton_attention

    g = torch.Generator().manual_seed(11)
    keys = 2 * triton_attention._decode_block_n(64) + 3  # two key blocks and a partial one
    q = _randn(2, 8, 2, 64, device=backend.device, generator=g)
    k, v = (_randn(2, 2, keys, 64, device=backend.device, generator=g) for _ in range(2))
    assert triton_attention.use_decode(q, k, rotary=None)
    mask = _mask("key_padding", 2, 8, 2, keys, g).to(backend.device)
    grad = _randn(2, 8, 2, 64, device=backend.device, generator=g)
    _compare_with_reference(q, k, v, grad, mask, enable_gqa=True)


def test_three_dim_inputs_and_strided_views(backend):
    """(N, L, E) inputs as torch accepts them, and q/k/v sliced from a fused qkv projection."""
    q3, k3, v3 = (_randn(3, 14, 32, device=backend.device) for _ in range(3))
    mask = torch.rand(14, 14, device=backend.device) > 0.4
    mask[:, 0] = True
    out = ops.scaled_dot_product_attention(q3, k3, v3, mask)
    assert out.shape == (3, 14, 32)
    assert_close(out, reference.scaled_dot_product_attention(q3.double(), k3.double(), v3.double(), mask))

    qkv = _randn(2, 15, 3, 4, 40, device=backend.device)  # (B, L, 3, H, E)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)         # each (B, H, L, E), strided
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out, expected)


@pytest.mark.parametrize("length, keys", [(0, 5), (4, 0), (0, 0)])
def test_empty_queries_or_keys(backend, length, keys):
    """No queries: an empty result; no keys: every row has nothing to attend, so zeros."""
    q = _randn(2, 2, length, 32, device=backend.device).requires_grad_()
    k, v = (_randn(2, 2, keys, 32, device=backend.device).requires_grad_() for _ in range(2))
    out = ops.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


def test_five_dim_inputs(backend):
    q, k, v = (_randn(2, 3, 4, 9, 32, device=backend.device) for _ in range(3))
    mask = torch.rand(3, 1, 9, 9, device=backend.device) > 0.3
    mask[..., 0] = True
    out = ops.scaled_dot_product_attention(q, k, v, mask)
    assert_close(out, reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask))


@pytest.mark.parametrize("q_shape, k_shape, v_shape, enable_gqa", [
    ((4, 9, 32), (3, 4, 11, 32), (3, 4, 11, 32), False),     # query (H, L, E), key (B, H, S, E)
    ((2, 1, 9, 32), (2, 3, 11, 32), (1, 3, 11, 32), False),  # one query head against three
    ((1, 4, 9, 32), (3, 2, 11, 32), (3, 2, 11, 32), True),   # batch broadcast under GQA
])
def test_batch_dims_broadcast_as_torch_does(backend, q_shape, k_shape, v_shape, enable_gqa):
    """torch's SDPA broadcasts the dims before (L, E) (the heads too, or before them under
    GQA); so does the drop-in, values and gradients (summed over the broadcast dims)."""
    g = torch.Generator().manual_seed(sum(q_shape) + sum(k_shape))
    inputs = [_randn(*shape, device=backend.device, generator=g) for shape in (q_shape, k_shape, v_shape)]
    mask = torch.rand(9, 11, generator=g).to(backend.device) > 0.3
    mask[:, 0] = True
    ours = [t.clone().requires_grad_() for t in inputs]
    exact = [t.double().requires_grad_() for t in inputs]
    out = ops.scaled_dot_product_attention(*ours, mask, is_causal=True, enable_gqa=enable_gqa)
    expected = F.scaled_dot_product_attention(*exact, mask & torch.ones(9, 11, dtype=torch.bool, device=mask.device).tril(),
                                              enable_gqa=enable_gqa)
    assert_close(out, expected.detach())
    grad = torch.randn(out.shape, generator=g).to(backend.device)
    out.backward(grad)
    expected.backward(grad.double())
    for name, a, e in zip(("dq", "dk", "dv"), ours, exact):
        assert a.grad.shape == a.shape
        assert_close(a.grad, e.grad, name=name)


def test_dropout_and_other_value_dims_go_to_torch():
    q, k, v = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    torch.manual_seed(0)
    ours = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    v48 = torch.randn(1, 2, 9, 48)
    torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v48), F.scaled_dot_product_attention(q, k, v48))


def test_float64_runs_the_reference():
    q, k, v = (torch.randn(1, 2, 9, 32, dtype=torch.float64) for _ in range(3))
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    bias = torch.randn(9, 9, dtype=torch.float64)  # kept in float64: float32 would be 1e-8 off
    torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v, bias),
                               F.scaled_dot_product_attention(q, k, v, bias), rtol=1e-12, atol=1e-12)


def test_float_mask_that_requires_grad_gets_it():
    q, k, v = (torch.randn(1, 2, 9, 32) for _ in range(3))
    bias = torch.randn(1, 1, 9, 9, requires_grad=True)
    ops.scaled_dot_product_attention(q, k, v, bias).sum().backward()
    expected = bias.detach().clone().requires_grad_()
    F.scaled_dot_product_attention(q, k, v, expected).sum().backward()
    torch.testing.assert_close(bias.grad, expected.grad)


# --------------------------------------------------------------------------- op contract


def test_opcheck_attention_ops(backend):
    g = torch.Generator().manual_seed(5)
    q = _randn(2, 4, 9, 40, device=backend.device, generator=g).requires_grad_()
    k = _randn(2, 2, 11, 40, device=backend.device, generator=g).requires_grad_()
    v = _randn(2, 2, 11, 40, device=backend.device, generator=g).requires_grad_()
    bias = torch.zeros(2, 1, 1, 11, device=backend.device).expand(2, 4, 9, 11)
    torch.library.opcheck(torch.ops.vlmfast.attention_fwd.default, (q, k, v, bias, 0.2, True, None, None))
    angles = torch.rand(11, 20, device=backend.device)
    k9, v9 = k[:, :, :9].detach().requires_grad_(), v[:, :, :9].detach().requires_grad_()
    torch.library.opcheck(torch.ops.vlmfast.attention_fwd.default,
                          (q, k9, v9, None, 0.2, False, angles[:9].cos(), angles[:9].sin()))
    out, lse = torch.ops.vlmfast.attention_fwd(q.detach(), k.detach(), v.detach(), bias, 0.2, True, None, None)
    torch.library.opcheck(torch.ops.vlmfast.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, bias, 0.2, True, None, None))

    qp, kp, vp, cu = _packed([4, 7], 4, 2, 40, torch.float32, backend.device, g)
    qp, kp, vp = (t.requires_grad_() for t in (qp, kp, vp))
    torch.library.opcheck(torch.ops.vlmfast.attention_varlen_fwd.default, (qp, kp, vp, cu, 7, 0.3, True, None, None))
    out, lse = torch.ops.vlmfast.attention_varlen_fwd(qp.detach(), kp.detach(), vp.detach(), cu, 7, 0.3, True, None, None)
    torch.library.opcheck(torch.ops.vlmfast.attention_varlen_bwd.default,
                          (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), out, lse, cu, 7, 0.3,
                           True, None, None))


def test_torch_compile_fullgraph():
    def block(q, k, v, mask, cos, sin, packed, cu):
        dense = ops.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, rotary=(cos, sin))
        varlen = ops.attention_varlen(*packed, cu, 8, is_causal=True)
        return dense, varlen

    compiled = torch.compile(block, fullgraph=True)
    q, k, v = torch.randn(2, 4, 8, 32), torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32)
    mask = torch.rand(2, 1, 1, 8) > 0.2
    mask[..., 0] = True
    angles = torch.rand(8, 16)
    packed = (torch.randn(13, 4, 32), torch.randn(13, 2, 32), torch.randn(13, 2, 32))
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    args = (q, k, v, mask, angles.cos(), angles.sin(), packed, cu)
    for got, expected in zip(compiled(*args), block(*args)):
        torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------- bad input


def _qkv(q_shape=(2, 4, 8, 32), k_shape=(2, 4, 8, 32), v_shape=None, dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(k_shape), torch.randn(v_shape or k_shape)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (lambda: (torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 32)), {}, ValueError,
         r"query: expected \(B, H, L, E\), got \(8, 32\)"),
        (lambda: (torch.randn(2, 4, 8, 32), torch.randn(3, 8, 32), torch.randn(3, 8, 32)), {}, ValueError,
         r"key: expected H = 4 heads like query \(pass enable_gqa=True"),
        (lambda: _qkv(v_shape=(3, 4, 8, 32)), {}, ValueError,
         r"value: expected batch dims broadcastable with query's \(2, 4\) before \(S, E\), got \(3, 4, 8, 32\)"),
        (lambda: _qkv(k_shape=(2, 2, 8, 32), v_shape=(2, 1, 8, 32)), {"enable_gqa": True}, ValueError,
         r"value: expected Hkv = 2 heads like key"),
        (lambda: _qkv(k_shape=(2, 4, 8, 40)), {}, ValueError, r"key: expected \(B, Hkv, S, E\) with E = 32 like query"),
        (lambda: _qkv(k_shape=(2, 4, 8, 32), v_shape=(2, 4, 9, 32)), {}, ValueError,
         r"value: expected \(B, Hkv, S, Ev\) with the \(B, Hkv, S\) of key \(2, 4, 8\)"),
        (lambda: _qkv(k_shape=(2, 3, 8, 32)), {"enable_gqa": True}, ValueError, r"Hkv dividing H = 4"),
        (lambda: _qkv(k_shape=(2, 2, 8, 32)), {}, ValueError, r"key: expected H = 4 heads like query \(pass enable_gqa=True"),
        (lambda: _qkv(k_shape=(3, 4, 8, 32)), {}, ValueError,
         r"key: expected batch dims broadcastable with query's \(2, 4\) before \(S, E\), got \(3, 4, 8, 32\)"),
        (lambda: (*_qkv(), torch.ones(3, 1, 8, 8, dtype=torch.bool)), {}, ValueError,
         r"attn_mask: expected a shape broadcastable to \(\.\.\., L, S\) = \(2, 4, 8, 8\), got \(3, 1, 8, 8\)"),
        (lambda: (*_qkv(), torch.ones(8, 8, dtype=torch.int64)), {}, TypeError, r"attn_mask: expected a bool or floating tensor"),
        (lambda: _qkv(dtype=torch.float16), {}, TypeError, r"key: expected the dtype of query \(torch.float16\), got torch.float32"),
        (lambda: (torch.randn(2, 4, 8, 32, device="meta"), torch.randn(2, 4, 8, 32), torch.randn(2, 4, 8, 32)), {},
         ValueError, r"key: expected a tensor on meta like query, got cpu"),
        (lambda: (torch.randint(0, 3, (2, 4, 8, 32)), torch.randn(2, 4, 8, 32), torch.randn(2, 4, 8, 32)), {},
         TypeError, r"query: expected a float32, float16, bfloat16 or float64 tensor"),
        (lambda: _qkv(k_shape=(2, 4, 9, 32)), {"rotary": (torch.ones(8, 16), torch.zeros(8, 16))}, ValueError,
         r"rotary: requires L == S .* got L = 8, S = 9"),
        (lambda: _qkv(), {"rotary": (torch.ones(8, 17), torch.zeros(8, 17))}, ValueError,
         r"rotary cos: expected \(L, R/2\) = \(8, R/2\) with 1 <= R/2 <= E/2 = 16"),
        (lambda: _qkv(), {"rotary": torch.ones(8, 16)}, TypeError, r"rotary: expected a \(cos, sin\) pair"),
        (lambda: _qkv(), {"scale": torch.tensor(0.1)}, TypeError, r"scale: expected a Python float or None"),
        (lambda: _qkv(), {"dropout_p": 1.5}, ValueError, r"dropout_p: expected a probability in \[0, 1\]"),
    ],
)
def test_sdpa_rejects(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.scaled_dot_product_attention(*args(), **kwargs)


def _varlen_args(cu=(0, 3, 8), dtype=torch.int32, total=8, k_heads=2, k_dim=32):
    return (torch.randn(total, 4, 32), torch.randn(total, k_heads, k_dim), torch.randn(total, k_heads, k_dim),
            torch.tensor(cu, dtype=dtype))


@pytest.mark.parametrize(
    "args, max_seqlen, kwargs, error, message",
    [
        (_varlen_args(dtype=torch.int64), 5, {}, TypeError, r"cu_seqlens: expected an int32 \(n \+ 1,\) tensor"),
        (_varlen_args(cu=(1, 3, 8)), 5, {}, ValueError, r"cu_seqlens: expected cumulative lengths starting at 0, got 1"),
        (_varlen_args(cu=(0, 5, 3, 8)), 5, {}, ValueError, r"cu_seqlens: expected non-decreasing cumulative lengths"),
        (_varlen_args(cu=(0, 3, 7)), 5, {}, ValueError, r"cu_seqlens: expected the last entry to be T = q.shape\[0\] = 8, got 7"),
        (_varlen_args(cu=((0, 3), (3, 8))), 5, {}, ValueError, r"cu_seqlens: expected int32 \(n \+ 1,\)"),
        (_varlen_args(), 4, {}, ValueError, r"max_seqlen: expected at least the longest sequence 5, got 4"),
        (_varlen_args(), 5.0, {}, TypeError, r"max_seqlen: expected a non-negative int"),
        (_varlen_args(k_heads=3), 5, {}, ValueError, r"Hkv dividing H = 4"),
        (_varlen_args(k_dim=40), 5, {}, ValueError, r"k: expected \(T, Hkv, E\) = \(8, Hkv, 32\) like q"),
        ((torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 32), torch.tensor([0, 8], dtype=torch.int32)), 8, {},
         ValueError, r"q: expected \(T, H, E\), got \(8, 32\)"),
        (_varlen_args(), 5, {"rotary": (torch.ones(7, 16), torch.ones(7, 16))}, ValueError,
         r"rotary cos: expected \(T, R/2\) = \(8, R/2\)"),
    ],
)
def test_varlen_rejects(args, max_seqlen, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.attention_varlen(*args, max_seqlen, **kwargs)
