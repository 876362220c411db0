"""The CPU attention's bfloat16 pair path (csrc/cpu/attention_pairs.h): with the GEMM's level at
AVX512-BF16 (or AMX), a bfloat16 forward and backward with tall row blocks run their products on
vdpbf16ps, P and dS rounded to bfloat16 (with rotary tables too: q and k rotated and rounded
first). Checked here: out, lse, dq, dk, dv against the float64 reference under the bfloat16 rule
(tests/tolerance.py), both backward strategies, over the shapes that exercise the tile edges
(head dims padded to 16, partial key blocks, odd row counts, causal, masks, biases, GQA, strided
inputs, rotary tables); that forcing a lower level switches it off (other bits, the same rule);
and that what it must not touch is bit for bit the float32 tiles' result (float32 inputs,
decode's few rows)."""

import pytest
import torch

from tests.native.test_attention_cpu import check_attention, random_inputs, rotary_tables
from vlmfast.native import attention as native
from vlmfast.native import linear as native_linear

pytestmark = pytest.mark.skipif("avx512_bf16" not in native_linear.available_isas(),
                                reason="the pair path needs AVX512-BF16")


@pytest.fixture
def pair_level():
    assert native_linear.force_isa("avx512_bf16") == "avx512_bf16"
    yield
    native_linear.force_isa(None)


def forward_at(level, q, k, v, **kwargs):
    native_linear.force_isa(level)
    try:
        return native.forward(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=False, **kwargs)
    finally:
        native_linear.force_isa(None)


@pytest.mark.usefixtures("pair_level")
@pytest.mark.parametrize("dim", [40, 64, 72, 128])
@pytest.mark.parametrize("length, keys, is_causal", [(197, 197, False), (130, 70, False), (100, 100, True),
                                                     (64, 5, False)])
def test_pair_path_against_float64(dim, length, keys, is_causal):
    # GQA (4 heads on 2), but for an odd length without it: 197 rows per (batch, head) in blocks of
    # 50, 50, 50, 47, whose last pairs its odd row with zeros
    kv_heads = 4 if length % 2 else 2
    q, k, v, grad = random_inputs(2, 4, kv_heads, length, keys, dim, torch.bfloat16, seed=dim + keys)
    check_attention(q, k, v, grad, is_causal=is_causal)


@pytest.mark.usefixtures("pair_level")
@pytest.mark.parametrize("kind", ["mask", "bias", "masked_rows"])
def test_pair_path_masks_and_biases(kind):
    q, k, v, grad = random_inputs(1, 3, 3, 96, 150, 64, torch.bfloat16, seed=3)
    gen = torch.Generator().manual_seed(4)
    if kind == "bias":
        bias = torch.randn(1, 3, 96, 150, generator=gen)
    else:
        bias = torch.rand(1, 1, 1, 150, generator=gen) > 0.3
        if kind == "masked_rows":  # whole rows see no key: out 0, lse -inf
            bias = (torch.rand(1, 1, 96, 1, generator=gen) > 0.2) & bias
        bias = torch.zeros(bias.shape).masked_fill(~bias, float("-inf")).expand(1, 3, 96, 150)
    check_attention(q, k, v, grad, bias=bias)


@pytest.mark.usefixtures("pair_level")
def test_pair_path_strided_inputs():
    """q, k, v as views into one fused (B, L, 3, H, E) projection, as the models pass them."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 150, 3, 6, 64, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    grad = torch.randn(2, 6, 150, 64, generator=gen).to(torch.bfloat16)
    check_attention(q, k, v, grad)


def test_lower_level_switches_the_pair_path_off():
    """The same bfloat16 problem at AVX512-BF16 and at AVX-512: other bits (P rounded to
    bfloat16 against float32 tiles), each within the rule of the float64 reference."""
    q, k, v, grad = random_inputs(1, 4, 4, 128, 128, 64, torch.bfloat16, seed=6)
    pairs, pairs_lse = forward_at("avx512_bf16", q, k, v)
    floats, _ = forward_at("avx512", q, k, v)
    assert not torch.equal(pairs, floats), "forcing AVX-512 did not change the forward's path"
    grads = {}
    for level in ("avx512_bf16", "avx512"):
        native_linear.force_isa(level)
        try:
            grads[level] = native._backward(grad, q, k, v, pairs, pairs_lse, scale=0.125, is_causal=False,
                                            bias=None, strategy="fused", rotary=None)
            check_attention(q, k, v, grad)
        finally:
            native_linear.force_isa(None)
    for name, high, low in zip(("dq", "dk", "dv"), grads["avx512_bf16"], grads["avx512"]):
        assert not torch.equal(high, low), f"forcing AVX-512 did not change the backward's path ({name})"


@pytest.mark.parametrize("level", ["avx512_bf16", "avx512"])
@pytest.mark.parametrize("dim, half, length, is_causal", [(64, 32, 197, False), (40, 8, 113, True),
                                                          (80, 40, 130, False)])
def test_rotary_tables_on_either_path(level, dim, half, length, is_causal):
    """Rotary tables: q and k rotated and rounded to bfloat16 first, then packed as pairs (or
    widened to the float32 tiles at AVX-512); out, lse, dq, dk, dv against the float64 reference
    of rotate, round, attend. Qwen2-VL's tower: E = 80, the whole head rotated."""
    q, k, v, grad = random_inputs(2, 4, 2, length, length, dim, torch.bfloat16, seed=dim + half)
    rotary = rotary_tables(length, half, seed=dim)
    native_linear.force_isa(level)
    try:
        check_attention(q, k, v, grad, is_causal=is_causal, rotary=rotary)
    finally:
        native_linear.force_isa(None)
    pairs, pairs_lse = forward_at("avx512_bf16", q, k, v, rotary=rotary)
    floats, floats_lse = forward_at("avx512", q, k, v, rotary=rotary)
    assert not torch.equal(pairs, floats), "rotary tables kept the float32 tiles at AVX512-BF16"


@pytest.mark.parametrize("case", ["float32", "decode"])
def test_what_stays_on_float_tiles(case):
    """float32 inputs and a decode step's few rows per block give the very bits of the float32
    tiles at either level."""
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    length = 1 if case == "decode" else 128
    q, k, v, _ = random_inputs(1, 6, 2, length, 300, 64, dtype, seed=7)
    high, high_lse = forward_at("avx512_bf16", q, k, v)
    low, low_lse = forward_at("avx512", q, k, v)
    assert torch.equal(high, low) and torch.equal(high_lse, low_lse)
