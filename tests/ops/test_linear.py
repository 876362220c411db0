"""vlmfast.ops.linear (C++ float32 GEMM + fused activation) against the float64 reference."""

import pytest
import torch

from tests.conftest import ForcedBackend
from tests.tolerance import assert_close
from vlmfast.ops import _dispatch, _linear_choice, linear, reference
from vlmfast.ops.linear import SMALL_M

ACTIVATIONS = [None, "quick_gelu", "gelu_tanh", "gelu"]


@pytest.fixture(autouse=True)
def kernel_always():
    """The C++ GEMM for every eligible call: no shape class handed to torch by measurement
    (ops/_linear_choice.py), so the tests below test the kernel."""
    previous = _linear_choice.set_mode("vlmfast")
    yield
    _linear_choice.set_mode(previous)


@pytest.fixture(params=["reference", "cpp"])
def cpu_backend(request, monkeypatch):
    """The CPU backends linear has (no Triton kernel: CUDA goes to cuBLAS); fails a test that
    never ran the forced one."""
    forced = ForcedBackend(request.param, "cpu")
    monkeypatch.setenv("VLMFAST_BACKEND", forced.name)
    before = forced.calls()
    yield forced
    assert forced.calls() > before, f"the test never ran the {forced.name} backend"


def _inputs(shape, n, bias=True, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    tensors = [t for t in (x, w, b) if t is not None]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, w, b


def _check(x, w, b, activation, grad_seed=1):
    """Values and every gradient against the float64 reference."""
    out = linear(x, w, b, activation=activation)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    x64, w64 = x.detach().double().requires_grad_(x.requires_grad), w.detach().double().requires_grad_(w.requires_grad)
    b64 = b.detach().double().requires_grad_(b.requires_grad) if b is not None else None
    expected = reference.linear(x64, w64, b64, activation)
    assert_close(out, expected)
    if not leaves:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t for t in (x64, w64, b64) if t is not None and t.requires_grad]
    want = torch.autograd.grad(expected, leaves64, grad.double())
    for name, g, g64 in zip(("x", "weight", "bias"), got, want):
        assert_close(g, g64, name=f"grad {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape, n",
    [((16, 40), 33), ((113, 72), 80), ((197, 100), 65), ((3, 37, 80), 77), ((2, 50, 64), 31)],
    ids=["16x40x33", "113x72x80", "197x100x65", "3x37x80-77", "2x50x64-31"],
)
def test_matches_reference(cpu_backend, shape, n, activation):
    _check(*_inputs(shape, n), activation)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_k_and_m_beyond_one_block(cpu_backend, activation):
    # K = 1700 splits into 3 reduction blocks; M = 230 spans 3 row blocks; dW reduces over M = 230.
    _check(*_inputs((230, 1700), 70, seed=3), activation)


def test_wide_reduction_in_the_weight_gradient(cpu_backend):
    # dW = dz^T x reduces over the 900 rows: beyond one reduction block of the kernel.
    _check(*_inputs((900, 24), 40, seed=4), "quick_gelu")


@pytest.mark.parametrize("layout", ["column-major", "sliced"])
def test_strided_x(cpu_backend, layout):
    g = torch.Generator().manual_seed(5)
    if layout == "column-major":
        x = torch.randn(72, 113, generator=g).T  # (113, 72), strides (1, 113)
    else:
        x = torch.randn(113, 150, generator=g)[:, 3:147:2]  # (113, 72), strides (150, 2)
    x.requires_grad_()
    w = (torch.randn(45, 72, generator=g) / 72**0.5).requires_grad_()
    b = torch.randn(45, generator=g).requires_grad_()
    assert not x.is_contiguous()
    _check(x, w, b, "gelu_tanh")


def test_no_bias_and_partial_gradients(cpu_backend):
    x, w, _ = _inputs((64, 48), 40, bias=False, seed=6)
    x.requires_grad_(False)  # the first layer of a model: only the weight needs a gradient
    _check(x, w, None, "quick_gelu")
    x, w, b = _inputs((64, 48), 40, seed=7)
    w.requires_grad_(False)
    b.requires_grad_(False)  # frozen layer: only x's gradient
    _check(x, w, b, None)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu_tanh", "gelu"])
def test_activation_tails(cpu_backend, activation):
    # Identity weight: out = act(x) over [-30, 30], where exponentials overflow if done naively
    # and erf-based gelu loses its relative accuracy in the negative tail.
    z = torch.linspace(-30, 30, 64 * 40).reshape(64, 40).requires_grad_()
    _check(z, torch.eye(40).requires_grad_(), None, activation)


@pytest.mark.parametrize("rows", [1, 3, SMALL_M - 1])
def test_few_rows_go_to_torch(rows):
    x, w, b = _inputs((rows, 40), 17, seed=8)
    before = _dispatch.calls[("linear", "cpp")]
    _check(x, w, b, "quick_gelu")
    assert _dispatch.calls[("linear", "cpp")] == before


def test_float64_equals_torch():
    # (bfloat16 and float16 run the C++ GEMM: tests/ops/test_linear_isa.py)
    x, w, b = (t.detach().to(torch.float64) for t in _inputs((40, 24), 20, seed=9))
    out = linear(x, w, b, activation="gelu")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.linear(x, w, b, "gelu"), rtol=0, atol=0)


def test_packed_weight_cache_follows_in_place_updates(monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    x, w, b = _inputs((40, 24), 20, seed=10, requires_grad=False)
    with torch.no_grad():
        first = linear(x, w, b)
        assert_close(first, reference.linear(x.double(), w.double(), b.double()))
        w.mul_(-2.0)  # in place: bumps the version counter, the cached panels must be redone
        assert_close(linear(x, w, b), reference.linear(x.double(), w.double(), b.double()))
        w2 = w.detach().clone()[:, :]  # a new tensor of the same shape: its own panels
        w2.add_(1.0)
        assert_close(linear(x, w2, b), reference.linear(x.double(), w2.double(), b.double()))


def _cached(native_linear, w) -> bool:
    entry = native_linear._packed_cache.get(id(w))
    return entry is not None and entry[2] is not None


def test_packed_copies_kept_in_inference_only_from_the_second_use(monkeypatch):
    # a frozen weight in training (LoRA, a frozen tower) must not gain a packed second copy; in
    # inference a weight used once (a generate's vision tower) must not either, one used again must
    from vlmfast.native import linear as native_linear

    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    x, w, b = _inputs((40, 24), 20, seed=11, requires_grad=False)
    x.requires_grad_()
    linear(x, w, b).sum().backward()
    linear(x, w, b).sum().backward()
    assert not _cached(native_linear, w)
    before = native_linear.cached_bytes()
    with torch.no_grad():
        first = linear(x, w, b)
        assert not _cached(native_linear, w) and native_linear.cached_bytes() == before
        second = linear(x, w, b)
        assert _cached(native_linear, w) and native_linear.cached_bytes() > before
        third = linear(x, w, b)
    want = reference.linear(x.double(), w.double(), b.double())
    for out in (first, second, third):
        assert_close(out, want)


def test_inference_mode_weights(monkeypatch):
    # Tensors made under inference_mode have no version counter: their panels are not cached.
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    with torch.inference_mode():
        x, w, b = (t.detach().clone() for t in _inputs((40, 24), 20, seed=13, requires_grad=False))
        assert_close(linear(x, w, b), reference.linear(x.double(), w.double(), b.double()))
        w.add_(0.5)
        assert_close(linear(x, w, b), reference.linear(x.double(), w.double(), b.double()))


def test_empty_rows_and_outputs():
    x = torch.randn(0, 24)
    w = torch.randn(20, 24)
    assert linear(x, w).shape == (0, 20)
    assert linear(torch.randn(32, 24), torch.randn(0, 24)).shape == (32, 0)
    bias = torch.randn(5)  # K = 0: act(bias) on every row
    torch.testing.assert_close(linear(torch.randn(20, 0), torch.randn(5, 0), bias, activation="gelu"),
                               torch.nn.functional.gelu(bias).expand(20, 5))


def test_opcheck():
    x, w, b = _inputs((40, 24), 20, seed=11)
    op = torch.ops.vlmfast.linear_fwd.default
    f32, bf16 = torch.float32, torch.bfloat16
    for activation in ("none", "quick_gelu"):
        torch.library.opcheck(op, (x, w, b, activation, True, False, f32))
        torch.library.opcheck(op, (x.detach(), w.detach(), None, activation, False, True, f32))
        torch.library.opcheck(op, (x, w, b, activation, True, False, bf16))  # autocast's rounding
    grad = torch.randn(40, 20)
    pre = torch.randn(40, 20)
    bwd = torch.ops.vlmfast.linear_bwd.default
    torch.library.opcheck(bwd, (grad, x.detach(), w.detach(), b.detach(), pre, "gelu", True, True, True, f32))
    torch.library.opcheck(bwd, (grad, x.detach(), w.detach(), None, torch.empty(0), "none", False, True, False, f32))
    torch.library.opcheck(bwd, (grad.to(bf16), x.detach(), w.detach(), b.detach(), pre.to(bf16), "gelu", True,
                                True, True, bf16))


def test_torch_compile_fullgraph():
    x, w, b = _inputs((2, 40, 24), 20, seed=12)

    def mlp(x, w, b):
        return linear(x, w, b, activation="quick_gelu").sum(-1)

    compiled = torch.compile(mlp, fullgraph=True)
    out = compiled(x, w, b)
    torch.testing.assert_close(out, mlp(x, w, b))
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    eager = torch.autograd.grad(mlp(x, w, b).sum(), (x, w, b))
    torch.testing.assert_close(grads, eager)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (([1.0], torch.randn(3, 4)), {}, TypeError, r"x: expected a torch.Tensor"),
        ((torch.randn(5, 4, dtype=torch.float32).int(), torch.randn(3, 4)), {}, TypeError, r"x: expected a float32"),
        ((torch.randn(5, 4), torch.randn(12)), {}, ValueError, r"weight: expected \(N, K\)"),
        ((torch.randn(5, 7), torch.randn(3, 4)), {}, ValueError, r"x: expected \(\.\.\., K\) with K = weight.shape\[1\] = 4, got \(5, 7\)"),
        ((torch.randn(5, 4), torch.randn(3, 4), torch.randn(4)), {}, ValueError, r"bias: expected \(N,\) = \(3,\), got \(4\)"),
        ((torch.randn(5, 4).double(), torch.randn(3, 4)), {}, TypeError, r"x: expected weight's dtype torch.float32"),
        ((torch.randn(5, 4), torch.randn(3, 4), torch.randn(3).double()), {}, TypeError, r"bias: expected weight's dtype"),
        ((torch.randn(5, 4), torch.randn(3, 4)), {"activation": "relu6"}, ValueError, r"activation: expected one of"),
        ((torch.randn(5, 4), torch.randn(3, 4, device="meta")), {}, ValueError, r"weight: expected a tensor on cpu like x"),
    ],
    ids=["x-not-tensor", "x-int", "weight-rank", "k-mismatch", "bias-shape", "x-dtype", "bias-dtype", "activation",
         "device"],
)
def test_rejects(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        linear(*args, **kwargs)
