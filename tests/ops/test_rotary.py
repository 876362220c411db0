"""apply_rotary_emb and rope_2d: every backend against the float64 reference and transformers."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(length, half, *, requires_grad=False, device="cpu", generator=None):
    angles = torch.rand(length, half, generator=generator, device=device) * 6.28
    cos, sin = angles.cos(), angles.sin()
    return cos.requires_grad_(requires_grad), sin.requires_grad_(requires_grad)


def _run_against_reference(x, cos, sin, grad, **options):
    """(fused outputs, float64 reference outputs, low-precision reference outputs): the output
    and the gradients of x, cos and sin."""

    def run(fn, dtype):
        xi = x.detach().to(dtype).requires_grad_()
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ci = cos.detach().to(table_dtype).requires_grad_(cos.requires_grad)
        si = sin.detach().to(table_dtype).requires_grad_(sin.requires_grad)
        out = fn(xi, ci, si)
        out.backward(grad.to(dtype))
        grads = [xi.grad] + ([ci.grad, si.grad] if cos.requires_grad else [])
        return [out.detach()] + grads

    seq_dim = options.get("seq_dim", -2)
    interleaved = options.get("interleaved", False)

    def ref(a, c, s):
        return reference.apply_rotary_emb(a, c, s, interleaved, seq_dim)

    fused = run(lambda a, c, s: ops.apply_rotary_emb(a, c, s, **options), x.dtype)
    return fused, run(ref, torch.float64), run(ref, x.dtype)


def _check(fused, exact, low):
    names = ["out", "grad_x", "grad_cos", "grad_sin"]
    for i, (f, e, lo) in enumerate(zip(fused, exact, low)):
        # Table gradients are float32 sums: they follow the float32 rule whatever x's dtype.
        if i >= 2 and f.dtype == torch.float32:
            scale = e.abs().max().item()
            bound = 3 * (lo.double() - e).abs().max().item() + 1e-5 * max(1.0, scale)
            assert (f.double() - e).abs().max().item() <= bound, names[i]
        else:
            assert_close(f, e, lo, factor=2.0 if i == 0 else 3.0, name=names[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "shape, seq_dim, half",
    [
        ((3, 4, 13, 40), -2, 20),    # (B, H, L, E), full rotary, odd length
        ((2, 13, 4, 72), 1, 36),     # (B, L, H, E): sequence not next to the head dim
        ((1, 113, 80), 1, 16),       # partial rotary: 32 of 80 dims turn
        ((17, 3, 64), 0, 32),        # (L, H, E), sequence first (Qwen2-VL vision layout)
        ((1, 1, 1, 32), 2, 8),       # length 1
    ],
)
def test_apply_rotary_emb_matches_reference(backend, dtype, interleaved, shape, seq_dim, half):
    generator = torch.Generator().manual_seed(hash((shape, seq_dim, half)) % 2**31)
    x = torch.randn(shape, generator=generator).to(dtype)
    cos, sin = _tables(shape[seq_dim], half, requires_grad=True, generator=generator)
    grad = torch.randn(shape, generator=generator)
    fused, exact, low = _run_against_reference(
        x.to(backend.device), cos.to(backend.device), sin.to(backend.device),
        grad.to(backend.device), interleaved=interleaved, seq_dim=seq_dim,
    )
    _check(fused, exact, low)


def test_apply_rotary_emb_on_a_strided_view(backend):
    """q sliced out of a fused (B, L, 3, H, E) qkv tensor: a view with gaps, no copy needed."""
    qkv = torch.randn(2, 11, 3, 4, 40, device=backend.device)
    q = qkv[:, :, 0]
    cos, sin = _tables(11, 20, device=backend.device)
    out = ops.apply_rotary_emb(q, cos, sin, seq_dim=1)
    expected = reference.apply_rotary_emb(q.double(), cos.double(), sin.double(), False, 1)
    assert_close(out, expected)


def test_tables_without_grad_get_none(backend):
    x = torch.randn(2, 3, 9, 32, device=backend.device, requires_grad=True)
    cos, sin = _tables(9, 16, device=backend.device)
    ops.apply_rotary_emb(x, cos, sin).sum().backward()
    assert cos.grad is None and sin.grad is None and x.grad is not None


def test_bfloat16_tables_are_read_in_float32(backend):
    """Tables in bf16 (as some models keep them) give the reference's answer and bf16 grads."""
    x = torch.randn(2, 7, 32, device=backend.device)
    cos, sin = _tables(7, 16, device=backend.device)
    cos16 = cos.bfloat16().requires_grad_()
    out = ops.apply_rotary_emb(x, cos16, sin.bfloat16())
    expected = reference.apply_rotary_emb(x.double(), cos16.double(), sin.bfloat16().double(), False, -2)
    assert_close(out, expected)
    out.sum().backward()
    assert cos16.grad.dtype == torch.bfloat16


def test_empty_input():
    """Nothing to rotate: the op returns before any backend is asked (so no backend fixture)."""
    x = torch.randn(0, 5, 32)
    cos, sin = _tables(5, 16)
    assert ops.apply_rotary_emb(x, cos, sin).shape == x.shape


# --------------------------------------------------------------------------- parity with transformers


def test_rope_2d_and_apply_match_qwen2_vl_vision_rotary(backend):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )

    head_dim, heads = 80, 3
    config = Qwen2VLVisionConfig(embed_dim=head_dim * heads, num_heads=heads)
    hf_rotary = Qwen2VLVisionRotaryEmbedding(config)
    # A 7 x 11 grid plus a 5 x 3 grid, as two images packed in one sequence.
    positions = torch.cat([_grid(7, 11), _grid(5, 3)]).to(backend.device)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1, device=backend.device), positions)

    cos, sin = ops.rope_2d(positions, head_dim, theta=config.rope_parameters["rope_theta"])
    assert cos.dtype == torch.float32 and cos.shape == (positions.shape[0], head_dim // 2)
    # transformers repeats the half table: our (N, E/2) table is its first half.
    torch.testing.assert_close(cos, hf_cos[:, : head_dim // 2], rtol=0, atol=2e-7)
    torch.testing.assert_close(sin, hf_sin[:, : head_dim // 2], rtol=0, atol=2e-7)

    q = torch.randn(positions.shape[0], heads, head_dim, device=backend.device)
    k = torch.randn_like(q)
    hf_q, hf_k = apply_rotary_pos_emb_vision(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(ops.apply_rotary_emb(q, cos, sin, seq_dim=0), hf_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.apply_rotary_emb(k, cos, sin, seq_dim=0), hf_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_llama_rotary(backend, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=4 * 64, num_attention_heads=4, max_position_embeddings=256)
    hf_rotary = LlamaRotaryEmbedding(config)
    batch, heads, length, head_dim = 2, 4, 37, 64
    q = torch.randn(batch, heads, length, head_dim, device=backend.device).to(dtype)
    k = torch.randn_like(q)
    position_ids = torch.arange(length, device=backend.device)[None].expand(batch, -1)
    hf_cos, hf_sin = hf_rotary(q, position_ids)
    hf_q, _ = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    # Our tables: the float32 angles of the first half, one row per position.
    cos, sin = hf_rotary(q.float(), position_ids[:1])
    cos, sin = cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]
    ours = ops.apply_rotary_emb(q, cos, sin)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, hf_q, rtol=1e-5, atol=1e-5)
    else:
        # transformers rounds its tables to bf16 and computes in bf16; ours computes in float32.
        # Both are within bf16 rounding of the float64 result; ours is the closer.
        exact = reference.apply_rotary_emb(q.double(), cos.double(), sin.double())
        assert (ours.double() - exact).abs().max() <= (hf_q.double() - exact).abs().max()


def _grid(height, width):
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack((rows, cols), dim=1)


@pytest.mark.parametrize("head_dim", [32, 40, 64, 72, 80, 128])
def test_rope_2d_matches_reference(backend, head_dim):
    positions = torch.randint(0, 96, (197, 2), device=backend.device)
    cos, sin = ops.rope_2d(positions, head_dim, theta=10000.0)
    exact_cos, exact_sin = reference.rope_2d(positions, head_dim, 10000.0, dtype=torch.float64)
    # Angles are formed in float32 (as transformers does): allow its rounding, position * eps.
    bound = 96 * torch.finfo(torch.float32).eps * 2
    assert (cos.double() - exact_cos).abs().max() <= bound
    assert (sin.double() - exact_sin).abs().max() <= bound


def test_rope_2d_accepts_int32_and_empty(backend):
    positions = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32, device=backend.device)
    cos32, _ = ops.rope_2d(positions, 16)
    cos64, _ = ops.rope_2d(positions.long(), 16)
    assert torch.equal(cos32, cos64)
    empty_cos, empty_sin = ops.rope_2d(positions[:0], 16)
    assert empty_cos.shape == (0, 8) and empty_sin.shape == (0, 8)


# --------------------------------------------------------------------------- op contract


def test_opcheck_rotary_ops():
    x = torch.randn(2, 5, 3, 40, requires_grad=True)
    cos, sin = _tables(5, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.vlmfast.rotary_fwd.default, (x, cos, sin, False, False, 1))
    torch.library.opcheck(torch.ops.vlmfast.rotary_fwd.default, (x, cos, sin, True, True, 1))
    grad = torch.randn(2, 5, 3, 40)
    torch.library.opcheck(torch.ops.vlmfast.rotary_bwd.default, (grad, x.detach(), 16, False, 1))
    torch.library.opcheck(torch.ops.vlmfast.rope_2d_fwd.default, (torch.randint(0, 9, (7, 2)), 32, 100.0))


def test_torch_compile_fullgraph():
    def block(q, k, positions):
        cos, sin = ops.rope_2d(positions, q.shape[-1])
        return ops.apply_rotary_emb(q, cos, sin) @ ops.apply_rotary_emb(k, cos, sin).transpose(-1, -2)

    compiled = torch.compile(block, fullgraph=True)
    q, k = torch.randn(2, 3, 12, 32), torch.randn(2, 3, 12, 32)
    positions = _grid(3, 4)
    torch.testing.assert_close(compiled(q, k, positions), block(q, k, positions))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.randn(8), *_tables(8, 4)), ValueError, r"x: expected \(\.\.\., L, \.\.\., E\)"),
        (lambda: (torch.randn(2, 8, 32), *_tables(9, 16)), ValueError, r"cos: expected \(L, R/2\) with L = x.shape\[1\] = 8"),
        (lambda: (torch.randn(2, 8, 32), *_tables(8, 17)), ValueError, r"1 <= R/2 <= E/2 = 16"),
        (lambda: (torch.randn(2, 8, 32), *_tables(8, 32)), ValueError, r"tables of width R"),
        (lambda: (torch.randn(2, 8, 32), torch.randn(8, 16), torch.randn(8, 15)), ValueError, r"sin: expected the shape of cos \(8, 16\)"),
        (lambda: (torch.randn(2, 8, 32), torch.randn(8, 4, 16), torch.randn(8, 4, 16)), ValueError, r"cos: expected \(L, R/2\)"),
        (lambda: (torch.randint(0, 5, (2, 8, 32)), *_tables(8, 16)), TypeError, r"x: expected a float32, float16, bfloat16 or float64 tensor, got torch.int64"),
        (lambda: (torch.randn(2, 8, 32), torch.ones(8, 16, dtype=torch.int32), torch.randn(8, 16)), TypeError, r"cos: expected a float32"),
        (lambda: ([[1.0]], *_tables(8, 16)), TypeError, r"x: expected a torch.Tensor, got list"),
        (lambda: (torch.randn(2, 8, 32, device="meta"), *_tables(8, 16)), ValueError, r"cos: expected a tensor on meta like x, got cpu"),
    ],
)
def test_apply_rotary_emb_rejects(make, error, message):
    with pytest.raises(error, match=message):
        ops.apply_rotary_emb(*make())


def test_apply_rotary_emb_rejects_seq_dim():
    x = torch.randn(2, 8, 32)
    cos, sin = _tables(8, 16)
    with pytest.raises(ValueError, match=r"seq_dim: the last dim of x is the head dim"):
        ops.apply_rotary_emb(x, cos, sin, seq_dim=-1)
    with pytest.raises(ValueError, match=r"seq_dim: expected an int in \[-3, 2\], got 3"):
        ops.apply_rotary_emb(x, cos, sin, seq_dim=3)


@pytest.mark.parametrize(
    "positions, head_dim, error, message",
    [
        (torch.zeros(4, 2, dtype=torch.long), 30, ValueError, r"head_dim: expected a positive multiple of 4"),
        (torch.zeros(4, 2, dtype=torch.long), 0, ValueError, r"head_dim: expected a positive multiple of 4"),
        (torch.zeros(4, 3, dtype=torch.long), 32, ValueError, r"positions: expected \(N, 2\) integer \(row, col\), got \(4, 3\)"),
        (torch.zeros(4, dtype=torch.long), 32, ValueError, r"positions: expected \(N, 2\)"),
        (torch.zeros(4, 2), 32, TypeError, r"positions: expected an integer tensor, got torch.float32"),
    ],
)
def test_rope_2d_rejects(positions, head_dim, error, message):
    with pytest.raises(error, match=message):
        ops.rope_2d(positions, head_dim)


def test_forced_backend_must_be_known(monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "fast")
    x = torch.randn(2, 8, 32)
    with pytest.raises(ValueError, match=r"VLMFAST_BACKEND: expected one of triton, cpp, cuda, reference, got 'fast'"):
        ops.apply_rotary_emb(x, *_tables(8, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_conversions_are_exact_for_every_value(backend, dtype):
    """Every finite 16-bit value (subnormals included) loads, computes in float32 and rounds back
    to nearest even exactly as torch does."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)]
    interpreted = backend.name == "triton" and backend.device.type == "cpu"
    if interpreted:
        # Triton's CPU interpreter flushes float32 subnormals to zero (bfloat16 shares float32's
        # exponent range, so its subnormals are float32 subnormals); GPUs and the C++ kernels don't.
        # Inputs and results in that range are left out there.
        every = every[(every == 0) | (every.float().abs() >= torch.finfo(torch.float32).tiny)]
    # Rows of 128 "rotate half" pairs: a = every value, b = every value reversed.
    every = torch.cat((every, every.new_zeros(-every.numel() % 128)))
    a, b = every.view(-1, 128), every.flip(0).view(-1, 128)
    x = torch.cat((a, b), dim=-1)[None].to(backend.device)  # (1, L, 256)
    length = x.shape[1]
    # sin = 0 keeps each result one rounded product, so kernels that fuse multiply-adds (more
    # accurate than torch's two roundings) still must agree bit for bit.
    for c, s in [(1.0, 0.0), (0.5, 0.0), (0.3, 0.0)]:
        cos = torch.full((length, 128), c, device=backend.device)
        sin = torch.full((length, 128), s, device=backend.device)
        xa, xb = a.float().to(backend.device), b.float().to(backend.device)
        exact = torch.cat((xa * c - xb * s, xb * c + xa * s), dim=-1)[None]
        out = ops.apply_rotary_emb(x, cos, sin)
        checked = torch.ones_like(exact, dtype=torch.bool)
        if interpreted:
            checked = (exact == 0) | (exact.abs() >= torch.finfo(torch.float32).tiny)
        assert torch.equal(out[checked].view(torch.int16), exact.to(dtype)[checked].view(torch.int16))
