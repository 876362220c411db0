"""The lean eager path of scaled_dot_product_attention on the CPU (ops/attention/lean.py ->
native forward_inference): a decode step with no gradient and no compile goes straight to the
C++ kernel; a training call with the same plain inputs goes straight to the eager autograd path. Checked against the float64 reference for every mask it takes
as given (bool key padding, full bool, float, a strided view of a cache's key mask), GQA, odd
head dims and lengths, fully masked rows; that it is the path that ran (and is counted as the
cpp backend); and that every call it must not take goes the full way with the same answer."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.native import attention as native_attention
from vlmfast.ops import _dispatch, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the calls of the lean launcher (and the cpp backend must be the one chosen)."""
    monkeypatch.delenv("VLMFAST_BACKEND", raising=False)
    calls = []
    original = native_attention.forward_inference

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(native_attention, "forward_inference", spy)
    return calls


def _inputs(batch, heads, kv_heads, length, keys, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(kind, batch, heads, length, keys, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, S), left padding as a batched decode has it
        start = torch.randint(0, keys, (batch,), generator=g)
        return (torch.arange(keys)[None, :] >= start[:, None])[:, None, None, :]
    if kind == "cache_view":  # key_mask[:, None, None, :S] of a longer cache: row stride > S
        full = torch.rand(batch, keys + 7, generator=g) > 0.3
        full[:, 0] = True
        return full[:, None, None, :keys]
    if kind == "bool_full":  # (B, H, L, S)
        mask = torch.rand(batch, heads, length, keys, generator=g) > 0.4
        mask[..., -1] = True
        return mask
    if kind == "float":  # (1, L, S) additive, broadcast over B and H, some -inf
        mask = torch.randn(length, keys, generator=g)
        return mask.masked_fill(torch.rand(length, keys, generator=g) > 0.7, float("-inf"))[None]
    raise AssertionError(kind)


def _expected(q, k, v, mask, dtype, **options):
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    return reference.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), ref_mask, **options)


CASES = [
    # (B, H, Hkv, L, S, E, mask)
    (1, 9, 3, 1, 113, 64, None),            # a SmolVLM2 decode step
    (3, 9, 3, 1, 197, 64, "key_padding"),  # batched, left padded
    (3, 4, 1, 1, 129, 80, "cache_view"),   # the cache's key mask as generate passes it
    (1, 2, 2, 3, 70, 40, "bool_full"),     # a few queries, E 40
    (2, 6, 2, 1, 1, 72, None),             # one key
    (2, 2, 2, 5, 33, 64, "float"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}")
def test_lean_path_matches_reference(lean_calls, dtype, case):
    batch, heads, kv_heads, length, keys, head_dim, kind = case
    q, k, v = _inputs(batch, heads, kv_heads, length, keys, head_dim, dtype)
    mask = _mask(kind, batch, heads, length, keys)
    before = _dispatch.calls[("attention", "cpp")]
    with torch.no_grad():
        out = ops.scaled_dot_product_attention(q, k, v, mask, enable_gqa=kv_heads != heads)
    assert lean_calls == [q.shape], "the lean path did not run"
    assert _dispatch.calls[("attention", "cpp")] == before + 1
    gqa = kv_heads != heads
    exact = _expected(q, k, v, mask, torch.float64, enable_gqa=gqa)
    low = _expected(q, k, v, mask, dtype, enable_gqa=gqa)
    assert_close(out, exact, low)


def test_lean_path_with_causal_scale_and_inference_mode(lean_calls):
    q, k, v = _inputs(2, 4, 2, 6, 6, 64, torch.float32)
    with torch.inference_mode():
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    assert len(lean_calls) == 1
    assert_close(out, _expected(q, k, v, None, torch.float64, is_causal=True, scale=0.2, enable_gqa=True))


def test_lean_path_gives_zeros_for_fully_masked_rows(lean_calls):
    q, k, v = _inputs(2, 2, 2, 1, 40, 64, torch.float32)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = ops.scaled_dot_product_attention(q, k, v, mask)
    assert len(lean_calls) == 1
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[0], _expected(q[:1], k[:1], v[:1], mask[:1], torch.float64)[0])


@pytest.mark.parametrize("mask_kind", [None, "key_padding", "bool_full", "float"])
def test_lean_training_call_equals_the_full_path(monkeypatch, mask_kind):
    """A training call the lean checks accept runs the C++ kernels through the eager autograd
    path (no forward_inference, no lse-less launch): values and gradients as the float64
    reference, one C++ forward and one C++ backward recorded."""
    monkeypatch.delenv("VLMFAST_BACKEND", raising=False)
    q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 9, 13, 40, torch.float32))
    mask = _mask(mask_kind, 2, 4, 9, 13)
    inference_calls = []
    original = native_attention.forward_inference
    monkeypatch.setattr(native_attention, "forward_inference", lambda *a: inference_calls.append(1) or original(*a))
    before = dict(_dispatch.calls)
    out = ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    ran = {key: n - before.get(key, 0) for key, n in _dispatch.calls.items() if n > before.get(key, 0)}
    assert ran == {("attention", "cpp"): 1, ("attention_bwd", "cpp"): 1} and inference_calls == []
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*leaves64, mask if mask is None or mask.dtype == torch.bool else mask.double(),
                                                      is_causal=True, enable_gqa=True)
    expected.backward(grad.double())
    assert_close(out.detach(), expected.detach())
    for name, t, t64 in zip(("dq", "dk", "dv"), (q, k, v), leaves64):
        assert_close(t.grad, t64.grad, name=name)


FULL_PATH = {
    # name: (inputs -> inputs, extra kwargs): calls the lean path must leave to the full one
    "grad_3d": (lambda q, k, v, m: (q[0].requires_grad_(), k[0], v[0], m), {}),
    "float16_mask": (lambda q, k, v, m: (q, k, v, torch.zeros(1, 1, 1, k.shape[2], dtype=torch.float16)), {}),
    "3d": (lambda q, k, v, m: (q[0], k[0], v[0], m), {}),
    "strided_head_dim": (lambda q, k, v, m: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, m), {}),
    "rotary": (lambda q, k, v, m: (q, k, v, m), "rotary"),
}


@pytest.mark.parametrize("name", list(FULL_PATH))
def test_other_calls_take_the_full_path_with_the_same_answer(lean_calls, name):
    q, k, v = _inputs(1, 2, 2, 4, 4, 32, torch.float32)
    change, kwargs = FULL_PATH[name]
    q, k, v, mask = change(q, k, v, None)
    if kwargs == "rotary":
        angles = torch.rand(4, 16)
        kwargs = {"rotary": (angles.cos(), angles.sin())}
    out = ops.scaled_dot_product_attention(q, k, v, mask, **kwargs)
    assert lean_calls == []
    with torch.no_grad():
        if "rotary" in kwargs:
            rq, rk = (ops.apply_rotary_emb(t.detach(), *kwargs["rotary"]) for t in (q, k))
            expected = reference.scaled_dot_product_attention(rq, rk, v, None)
        else:
            expected = reference.scaled_dot_product_attention(q.detach(), k, v, mask)
    assert_close(out.detach(), expected.double())


def test_bad_input_still_raises_the_full_path_errors(lean_calls):
    q, k, v = _inputs(1, 4, 2, 1, 8, 32, torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pass enable_gqa=True"):
            ops.scaled_dot_product_attention(q, k, v)
        with pytest.raises(ValueError, match=r"attn_mask: expected a shape broadcastable to \(\.\.\., L, S\)"):
            ops.scaled_dot_product_attention(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool), enable_gqa=True)
        with pytest.raises(TypeError, match="attn_mask: expected a bool or floating tensor"):
            ops.scaled_dot_product_attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.int32), enable_gqa=True)
        with pytest.raises(TypeError, match="scale: expected a Python float or None"):
            ops.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.5), enable_gqa=True)
        with pytest.raises(TypeError, match="key: expected the dtype of query"):
            ops.scaled_dot_product_attention(q, k.double(), v, enable_gqa=True)
    assert lean_calls == []


def test_forced_reference_backend_skips_the_lean_path(lean_calls, monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "reference")
    q, k, v = _inputs(1, 2, 2, 1, 16, 32, torch.float32)
    before = _dispatch.calls[("attention", "reference")]
    with torch.no_grad():
        out = ops.scaled_dot_product_attention(q, k, v)
    assert lean_calls == [] and _dispatch.calls[("attention", "reference")] == before + 1
    assert_close(out, _expected(q, k, v, None, torch.float64))


def test_decode_call_compiles_fullgraph(lean_calls):
    """Under torch.compile the lean path steps aside before touching data pointers: the call
    traces through the custom op as one graph."""
    q, k, v = _inputs(2, 4, 2, 1, 9, 32, torch.float32)
    mask = _mask("key_padding", 2, 4, 1, 9)
    compiled = torch.compile(lambda *a: ops.scaled_dot_product_attention(*a, enable_gqa=True), fullgraph=True)
    with torch.no_grad():
        got = compiled(q, k, v, mask)
    assert lean_calls == []
    assert_close(got, _expected(q, k, v, mask, torch.float64, enable_gqa=True))
