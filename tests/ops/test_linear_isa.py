"""vlmfast.ops.linear on the CPU in float32, bfloat16 and float16 and under autocast, with every
instruction-set path of the C++ GEMM forced in turn (the ones this CPU can run; AMX only where
the OS grants it), against the float64 reference within tests/tolerance.py's rule: for 16-bit
results, at most 2x (values) / 3x (gradients) the error of torch's own linear in that dtype."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast.native import linear as native_linear
from vlmfast.ops import _linear_choice, linear, reference

ACTIVATIONS = [None, "quick_gelu", "gelu_tanh", "gelu"]


@pytest.fixture(autouse=True)
def kernel_always(monkeypatch):
    """The C++ GEMM for every eligible call (no hand-off to torch by measurement)."""
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    previous = _linear_choice.set_mode("vlmfast")
    yield
    _linear_choice.set_mode(previous)


@pytest.fixture(params=native_linear.ISA_NAMES)
def isa(request):
    """Forces the instruction set; skips the ones this CPU (or OS) cannot run; fails a test whose
    GEMMs did not run that kernel (float32 operands run the AVX-512 one above AVX-512)."""
    if request.param not in native_linear.available_isas():
        pytest.skip(f"this CPU cannot run {request.param}")
    assert native_linear.force_isa(request.param) == request.param
    before = native_linear.kernel_calls()
    yield request.param
    after = native_linear.kernel_calls()
    native_linear.force_isa(None)
    ran = {name for name in after if after[name] > before[name]}
    assert ran, f"no GEMM ran under {request.param}"
    allowed = {request.param, "avx512"} if request.param in ("avx512_bf16", "amx") else {request.param}
    assert ran <= allowed, f"forced {request.param}, but {sorted(ran)} ran"


def _inputs(m, k, n, dtype, seed, bias=True, x_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(x_dtype or dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _grads(out, leaves, grad):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad)


def _check(x, w, b, activation, seed=1):
    """Output and gradients of linear against float64, and against torch's own linear in the
    same dtype for the 16-bit bound."""
    out = linear(x, w, b, activation=activation)
    assert out.dtype == x.dtype
    up = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    same = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    expected = reference.linear(*up, activation)
    torch_out = reference.linear(*same, activation)
    assert_close(out, expected, torch_out)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    for name, got, want, low in zip(("x", "weight", "bias"), _grads(out, (x, w, b), grad),
                                    _grads(expected, up, grad.double()), _grads(torch_out, same, grad)):
        assert got.dtype == low.dtype
        assert_close(got, want, low, factor=3.0, name=f"grad {name}")


# M, K, N not multiples of any tile (12 or 32 rows, 32 columns, 2 or 32 reduction steps), K
# beyond one reduction block (fp32 blocks of ~192 steps, bf16 ~384 here), and a wide reduction
# in the weight gradient (M = 700).
SHAPES = [(37, 45, 50), (113, 72, 80), (64, 1700, 33), (700, 24, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_isa(isa, dtype, shape):
    m, k, n = shape
    for i, activation in enumerate(ACTIVATIONS):
        _check(*_inputs(m, k, n, dtype, seed=10 * m + i), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_edge_sliver_height(isa, dtype):
    # The last sliver of a row block runs a kernel of its own height (1 .. MR - 1 rows, MR = 4,
    # 6, 12 or 32): every height, each in a full 32-column panel and an edge one (N = 40), the
    # float32 output written in place and the bf16 one through the per-thread block. The weight
    # gradient's rows are N, so its edge sliver (40 = 3 x 12 + 4) is covered too.
    for m in list(range(1, 14)) + [31, 33]:
        _check(*_inputs(m, 70, 40, dtype, seed=100 + m), "gelu" if m % 2 else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_strided_operands(isa, dtype):
    g = torch.Generator().manual_seed(3)
    cols = torch.randn(72, 113, generator=g).to(dtype).T.requires_grad_()  # (113, 72), strides (1, 113)
    sliced = torch.randn(113, 150, generator=g).to(dtype)[:, 3:147:2].requires_grad_()  # strides (150, 2)
    w = (torch.randn(45, 72, generator=g) / 72**0.5).to(dtype).T.contiguous().T.requires_grad_()
    b = torch.randn(45, generator=g).to(dtype).requires_grad_()
    for x in (cols, sliced):
        assert not x.is_contiguous()
        _check(x, w, b, "gelu_tanh")


@pytest.mark.parametrize("activation", ["gelu_tanh", None])
def test_autocast_bf16(isa, activation):
    # float32 parameters and input under CPU autocast: bf16 out, gradients in float32, as
    # torch's autocast linear gives them
    x, w, b = _inputs(67, 90, 70, torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b, activation=activation)
        same = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        torch_out = reference.linear(*same, activation)
    assert out.dtype == torch.bfloat16 and torch_out.dtype == torch.bfloat16
    up = [t.detach().double().requires_grad_() for t in (x, w, b)]
    # the float64 reference of what autocast computes: operands rounded to bf16 first
    expected = reference.linear(*(t.to(torch.bfloat16).double() for t in up), activation)
    assert_close(out, expected, torch_out)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    got = _grads(out, (x, w, b), grad)
    low = _grads(torch_out, same, grad)
    want = _grads(expected, up, grad.double())
    for name, g1, g2, g3 in zip(("x", "weight", "bias"), got, want, low):
        assert g1.dtype == torch.float32
        assert_close(g1.to(torch.bfloat16), g2, g3.to(torch.bfloat16), factor=3.0, name=f"grad {name}")


def test_bf16_weight_under_autocast_with_float32_input(isa):
    # a bf16 model run under autocast: x float32 (a LayerNorm's output), weight bf16
    x, _, _ = _inputs(40, 64, 24, torch.float32, seed=7)
    _, w, b = _inputs(40, 64, 24, torch.bfloat16, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b, activation="gelu")
    expected = reference.linear(x.detach().to(torch.bfloat16).double(), w.detach().double(), b.detach().double(), "gelu")
    low = reference.linear(x.detach().to(torch.bfloat16), w.detach(), b.detach(), "gelu")
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, low)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.bfloat16


def test_packed_weight_cache_follows_the_isa(monkeypatch):
    # a cached bf16 panel of one layout must not be read by another level's kernel
    available = native_linear.available_isas()
    x, w, b = (t.detach() for t in _inputs(48, 40, 36, torch.bfloat16, seed=9))
    want = reference.linear(x.double(), w.double(), b.double())
    low = reference.linear(x, w, b)
    try:
        with torch.no_grad():
            for name in reversed(available):
                native_linear.force_isa(name)
                assert_close(linear(x, w, b), want, low, name=f"output under {name}")
    finally:
        native_linear.force_isa(None)


def test_cpu_description_and_peak():
    info = native_linear.describe()
    assert info["isa"] in native_linear.ISA_NAMES
    assert 8 << 10 <= info["l1d"] <= info["l2"] and info["l2"] <= 64 << 20
    assert info["f32_kc"] >= 8 and info["f32_mc"] >= 4
    for dtype in (torch.float32, torch.bfloat16):
        assert native_linear.measure_peak(dtype, ms=2.0, threads=1) > 0.001  # TFLOP/s


def test_choice_by_measurement_is_cached_and_reported():
    _linear_choice.set_mode("measure")
    x, w, b = (t.detach() for t in _inputs(64, 48, 40, torch.float32, seed=11))
    with torch.no_grad():
        first = linear(x, w, b)
        decided = _linear_choice.decisions()
        second = linear(x, w, b)
    assert len(decided) == 1 and decided[0]["backend"] in ("vlmfast", "torch")
    assert decided[0]["n"] == 40 and decided[0]["k"] == 48 and decided[0]["m_bucket"] == 64
    assert _linear_choice.decisions() == decided  # measured once per class
    want = reference.linear(x.double(), w.double(), b.double())
    assert_close(first, want)
    assert_close(second, want)
    # a training call's forward (keeping the pre-activation) and its backward (three gradients)
    # are classes of their own, the weight packed per call
    _check(*(t.clone().requires_grad_() for t in (x, w, b)), "gelu")
    works = sorted(d["work"] for d in _linear_choice.decisions())
    assert works == ["backward:xwb", "cached", "forward+pre"]
    assert all(d["backend"] in ("vlmfast", "torch") for d in _linear_choice.decisions())


def test_a_frozen_layer_is_classed_by_the_work_it_does():
    """A frozen layer in a training step: its forward alone (nothing to differentiate: a frozen
    tower) or its forward and dx alone (a frozen decoder layer between trained parts), each timed
    as that, not as a trained layer's forward + three gradients."""
    _linear_choice.set_mode("measure")
    x, w, b = (t.detach() for t in _inputs(64, 48, 40, torch.float32, seed=13))
    want = reference.linear(x.double(), w.double(), b.double(), "gelu")
    assert_close(linear(x, w, b, activation="gelu"), want)  # gradients on, none needed
    assert [d["work"] for d in _linear_choice.decisions()] == ["forward"]
    xg = x.clone().requires_grad_()
    out = linear(xg, w, b, activation="gelu")
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, [xg], grad)
    up = x.double().requires_grad_()
    (want_dx,) = torch.autograd.grad(reference.linear(up, w.double(), b.double(), "gelu"), [up], grad.double())
    assert_close(dx, want_dx)
    assert sorted(d["work"] for d in _linear_choice.decisions()) == ["backward:x", "forward", "forward+pre"]


@pytest.mark.parametrize("forward, backward", [("vlmfast", "torch"), ("torch", "vlmfast")])
def test_forward_and_backward_on_different_gemms(forward, backward):
    """The forward's class and the backward's are decided apart: one side's saved
    pre-activation feeds the other side's backward, every gradient still right."""
    _linear_choice.set_mode("measure")
    x, w, b = _inputs(64, 48, 40, torch.float32, seed=14)
    keys = {"forward+pre": forward, "backward:xwb": backward}
    for work, backend in keys.items():
        key = _linear_choice.shape_class(64, 40, 48, torch.float32, torch.float32, torch.float32, work)
        _linear_choice._decisions[key] = {"backend": backend}
    before = native_linear.kernel_calls()
    _check(x, w, b, "quick_gelu")
    assert sum(native_linear.kernel_calls().values()) > sum(before.values())  # ours ran one of the two
    assert sorted(d["work"] for d in _linear_choice.decisions()) == sorted(keys)  # nothing timed


def test_choice_forced_to_torch_runs_no_kernel():
    _linear_choice.set_mode("torch")
    before = sum(native_linear.kernel_calls().values())
    x, w, b = _inputs(64, 48, 40, torch.float32, seed=12)
    _check(x, w, b, "quick_gelu")
    assert sum(native_linear.kernel_calls().values()) == before


@pytest.fixture
def emulated_amx():
    """The AMX level on emulated tiles (the real kernel's layout and addressing, the tile
    arithmetic in plain float32): the AMX packing (32-row slivers of 32-step tiles, K padded to
    32), driver and epilogues on a CPU without AMX. Where the CPU has AMX the fixture's own
    "amx" parameter of `isa` runs the real tiles."""
    if "avx512_bf16" not in native_linear.available_isas():
        pytest.skip("the emulation uses the AVX512-BF16 packers")
    if "amx" in native_linear.available_isas():
        pytest.skip("this CPU runs real AMX tiles (the isa fixture's amx case)")
    native_linear.emulate_amx(True)
    try:
        assert native_linear.force_isa("amx") == "amx"
        before = native_linear.kernel_calls()["amx"]
        yield
        assert native_linear.kernel_calls()["amx"] > before, "no GEMM ran on the (emulated) AMX kernel"
    finally:
        native_linear.emulate_amx(False)
        native_linear.force_isa(None)


@pytest.mark.parametrize("shape", [(37, 45, 50), (70, 100, 33)], ids=lambda s: "x".join(map(str, s)))
def test_amx_layout_on_emulated_tiles(emulated_amx, shape):
    m, k, n = shape
    for i, activation in enumerate((None, "gelu_tanh")):
        _check(*_inputs(m, k, n, torch.bfloat16, seed=7 * m + i), activation)
    x, w, b = _inputs(m, k, n, torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b)
    expected = reference.linear(*(t.detach().to(torch.bfloat16).double() for t in (x, w, b)))
    assert_close(out, expected, reference.linear(*(t.detach().to(torch.bfloat16) for t in (x, w, b))))
