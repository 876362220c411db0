"""The GEMM with B left unpacked (vlmfast/native/linear.py: operand -> Unpacked; csrc/cpu/gemm.cpp
packs each slice of B inside the task that sweeps it): the very bits of the GEMM on B packed
beforehand, on every instruction-set path this CPU runs (AMX on emulated tiles where it has none),
and the float64 product of the operands rounded to the compute dtype."""

import pytest
import torch

from tests.ops.test_linear_isa import emulated_amx, isa  # noqa: F401  (fixtures)
from vlmfast.native import linear as native_linear
from vlmfast.native._common import module_for
from vlmfast.ops import _linear_choice, linear, reference

# (M, K, N): M not a multiple of any sliver (12 or 32 rows), K over several reduction blocks
# (~256 steps) and odd (the bf16 pairs and AMX's 32-step tiles pad it), N ending in a part panel.
SHAPES = [(37, 300, 200), (5, 45, 130), (64, 1001, 160)]
# (B's dtype, compute dtype): plain float32 / bfloat16 / float16, and autocast's float32 weight
# rounded to bfloat16 as it is packed
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float16)]


@pytest.fixture(autouse=True)
def two_threads():
    """Two threads: the unpacked path needs two panels of B per thread, whatever the machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _operands(m, k, n, b_dtype, compute, steps_major, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(compute)
    # steps-major: B as the backward reads W (a transposed view, columns contiguous)
    b = torch.randn(k, n, generator=g).to(b_dtype).t() if steps_major else torch.randn(n, k, generator=g).to(b_dtype)
    bias = torch.randn(n, generator=g)
    return a, b, bias


def _expected(a, b, bias, compute, activation):
    """float64 product of the operands as the kernel sees them (rounded to the compute dtype)."""
    z = a.to(compute).double() @ b.to(compute).double().t() + bias.double()
    return z, reference.LINEAR_ACTIVATIONS[activation](z) if activation else z


def _run_both(a, b, bias, compute, activation):
    unpacked = native_linear.operand(b, compute, rows=a.shape[0])
    assert isinstance(unpacked, native_linear.Unpacked)
    got = native_linear.gemm(a, unpacked, bias, activation, keep_pre=True)
    packed = native_linear.gemm(a, native_linear.pack(b, compute), bias, activation, keep_pre=True)
    return got, packed


@pytest.mark.parametrize("b_dtype, compute", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("steps_major", [False, True], ids=["rows", "steps"])
def test_unpacked_equals_packed_and_float64(isa, b_dtype, compute, shape, steps_major):
    m, k, n = shape
    a, b, bias = _operands(m, k, n, b_dtype, compute, steps_major, seed=m + k)
    (out, pre), (packed_out, packed_pre) = _run_both(a, b, bias, compute, "gelu_tanh")
    assert torch.equal(out, packed_out) and torch.equal(pre, packed_pre)
    want_pre, want = _expected(a, b, bias, compute, "gelu_tanh")
    tol = dict(rtol=1e-4, atol=1e-4) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pre.double(), want_pre, **tol)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("level, compute, block", [("avx512", torch.float32, "f32_mc"),
                                                  ("avx512_bf16", torch.bfloat16, "bf16_mc")])
def test_two_row_blocks(level, compute, block):
    """Rows just past one cache block (its size from the GEMM's own description): two blocks, each
    slice of B packed by two tasks, still the bits of the packed GEMM."""
    if level not in native_linear.available_isas():
        pytest.skip(f"this CPU cannot run {level}")
    native_linear.force_isa(level)
    try:
        m = native_linear.describe()[block] + 37
        a, b, bias = _operands(m, 300, 200, compute, compute, False, seed=11)
        (out, _), (packed_out, _) = _run_both(a, b, bias, compute, "quick_gelu")
        assert torch.equal(out, packed_out)
        tol = dict(rtol=1e-4, atol=1e-4) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out.double(), _expected(a, b, bias, compute, "quick_gelu")[1], **tol)
        assert isinstance(native_linear.operand(b, compute, rows=2 * m), native_linear.Packed)
    finally:
        native_linear.force_isa(None)


def test_unpacked_on_emulated_amx_tiles(emulated_amx):  # noqa: F811
    a, b, bias = _operands(37, 301, 200, torch.bfloat16, torch.bfloat16, False, seed=5)
    (out, _), (packed_out, _) = _run_both(a, b, bias, torch.bfloat16, None)
    assert torch.equal(out, packed_out)
    torch.testing.assert_close(out.double(), _expected(a, b, bias, torch.bfloat16, None)[1], rtol=2e-2, atol=2e-2)


def test_operand_packs_where_the_tasks_cannot():
    """Rows beyond two cache blocks (each slice would be packed three times or more) or too few
    panels for the threads: B is packed whole, into the scratch buffer."""
    w = torch.randn(200, 64)
    assert isinstance(native_linear.operand(w, rows=37), native_linear.Unpacked)
    assert isinstance(native_linear.operand(w, rows=100_000), native_linear.Packed)
    assert isinstance(native_linear.operand(torch.randn(40, 64), rows=37), native_linear.Packed)


def test_kernel_refuses_an_unpacked_problem_it_cannot_split():
    a, b = torch.randn(100_000, 8), torch.randn(200, 8)
    with pytest.raises(ValueError, match="unpacked B"):
        native_linear.gemm(a, native_linear.Unpacked(b, torch.float32))


def test_linear_runs_few_rows_unpacked_forward_and_backward(monkeypatch):
    """ops.linear on few rows in a training step (no packed copy kept): all three GEMMs run on
    their B unpacked, and the result is the float64 one."""
    module = module_for(torch.device("cpu"))
    calls = []
    original = module.gemm_forward_unpacked

    def counted(**kwargs):
        calls.append(kwargs["M"])
        return original(**kwargs)

    monkeypatch.setattr(module, "gemm_forward_unpacked", counted)
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    previous = _linear_choice.set_mode("vlmfast")
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(40, 192, generator=g, requires_grad=True)
        w = (torch.randn(160, 192, generator=g) / 10).requires_grad_()
        b = torch.randn(160, generator=g, requires_grad=True)
        out = linear(x, w, b, activation="quick_gelu")
        out.backward(torch.ones_like(out))
    finally:
        _linear_choice.set_mode(previous)
    # the forward and dx = dz W (40 rows against W), dW = dz^T x (160 rows against x)
    assert sorted(calls) == [40, 40, 160], calls
    up = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = reference.linear(*up, "quick_gelu")
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip((x.grad, w.grad, b.grad), (t.grad for t in up)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
