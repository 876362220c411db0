"""ops.swiglu: every backend against the float64 reference (the eager composite F.silu(gate) * up
and its autograd), odd and strided shapes, the op contract and bad input."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _eager(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _outputs(fn, gate_up, grad, dtype):
    x = gate_up.detach().to(dtype).requires_grad_()
    out = fn(x)
    out.backward(grad.to(dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 113, 2 * 40), (1, 1, 2), (2, 7, 2 * 1536), (5, 2 * 37), (2 * 16,)])
def test_matches_float64_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    # gates across silu's whole range: its negative tail, the bend, the linear part
    gate_up = (torch.randn(shape, generator=g) * 4).to(backend.device)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(backend.device)
    fused = _outputs(ops.swiglu, gate_up, grad, dtype)
    exact = _outputs(_eager, gate_up, grad, torch.float64)
    low = _outputs(_eager, gate_up, grad, dtype)
    assert_close(fused[0], exact[0], low[0], factor=2.0, name="out")
    assert_close(fused[1], exact[1], low[1], factor=3.0, name="grad_gate_up")
    assert fused[0].dtype == dtype and fused[1].dtype == dtype


def test_strided_gate_up(backend):
    """gate_up a view (every other row of a wider buffer, then a column slice): the kernels read
    it in place or through a copy, and give what the eager composite gives."""
    wide = torch.randn(9, 4, 2 * 24 + 6).to(backend.device)
    gate_up = wide[::2, :, 3:-3].requires_grad_()
    assert not gate_up.is_contiguous()
    out = ops.swiglu(gate_up)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = _eager(gate_up.detach().double().requires_grad_())
    expected.backward(grad.double())
    assert_close(out, expected.detach())
    assert gate_up.grad is not None


def test_reference_backward_is_autograd_of_the_composite():
    """reference.swiglu_backward (the kernels' oracle for rounding) is the eager composite's
    gradient: bit for bit in bfloat16, where the rounding points matter."""
    gate_up = (torch.randn(4, 33, 2 * 50, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    grad = torch.randn(4, 33, 50).bfloat16()
    x = gate_up.clone().requires_grad_()
    _eager(x).backward(grad)
    assert torch.equal(reference.swiglu_backward(grad, gate_up), x.grad)


def test_backward_keeps_only_gate_up():
    """The graph saves gate_up alone (the composite also keeps silu(gate))."""
    gate_up = torch.randn(6, 2 * 20, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu(gate_up)
    assert len(saved) == 1 and saved[0].shape == gate_up.shape


def test_empty_rows():
    gate_up = torch.randn(0, 3, 2 * 8, requires_grad=True)
    out = ops.swiglu(gate_up)
    assert out.shape == (0, 3, 8)
    out.sum().backward()
    assert gate_up.grad.shape == gate_up.shape


def test_opcheck():
    gate_up = torch.randn(3, 5, 2 * 24, requires_grad=True)
    torch.library.opcheck(torch.ops.vlmfast.swiglu_fwd.default, (gate_up,))
    torch.library.opcheck(torch.ops.vlmfast.swiglu_bwd.default, (torch.randn(3, 5, 24), gate_up.detach()))


def test_torch_compile_fullgraph():
    def mlp(x, w):
        return ops.swiglu(x @ w.T)

    compiled = torch.compile(mlp, fullgraph=True)
    x, w = torch.randn(7, 16), torch.randn(2 * 12, 16)
    torch.testing.assert_close(compiled(x, w), mlp(x, w))


@pytest.mark.parametrize(
    "value, error, message",
    [
        (torch.randn(4, 7), ValueError, r"gate_up: expected \(\.\.\., 2 I\), an even last dim, got \(4, 7\)"),
        (torch.tensor(1.0), ValueError, r"gate_up: expected \(\.\.\., 2 I\)"),
        (torch.ones(4, 8, dtype=torch.int32), TypeError, r"gate_up: expected a float32"),
        ([1.0, 2.0], TypeError, r"gate_up: expected a torch.Tensor"),
    ],
)
def test_bad_input(value, error, message):
    with pytest.raises(error, match=message):
        ops.swiglu(value)
