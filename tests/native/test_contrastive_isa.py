"""The C++ contrastive losses with the GEMM's instruction set forced in turn: AVX-512 runs the tiles
on the Linear GEMM's 12 x 32 micro-kernel (packed slivers of the features and of G), lower levels
the portable register block. Loss and every gradient against the float64 reference, at batch
sizes and feature dims that are multiples of no block (tiles of 96 rows, slivers of 12, panels
of 32), in float32 and bf16."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.native import linear as native_linear
from vlmfast.ops import reference


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, monkeypatch):
    if request.param not in native_linear.available_isas():
        pytest.skip(f"this CPU cannot run {request.param}")
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    assert native_linear.force_isa(request.param) == request.param
    yield request.param
    native_linear.force_isa(None)


def _features(B, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g).to(dtype).requires_grad_() for _ in range(2)]


def _check(loss_fn, ref_fn, a, b, params):
    loss = loss_fn(a, b, *params)
    grads = torch.autograd.grad(loss, (a, b, *params))
    up = [t.detach().double().requires_grad_() for t in (a, b, *params)]
    want = ref_fn(*up)
    want_grads = torch.autograd.grad(want, up)
    low = None
    if a.dtype != torch.float32:
        same = [t.detach().clone().requires_grad_() for t in (a, b, *params)]
        low_loss = ref_fn(*same)
        low = torch.autograd.grad(low_loss, same)
        assert_close(loss, want, low_loss, name="loss")
    else:
        assert_close(loss, want, name="loss")
    for i, (got, exp) in enumerate(zip(grads, want_grads)):
        if low is not None and i >= 2:
            # a float32 scale / bias fed by bf16 features: the bf16 rule (3x torch's error in bf16)
            error = (got.double() - exp).abs().max().item()
            bound = 3 * (low[i].double() - exp).abs().max().item() + 1e-5 * max(1.0, exp.abs().max().item())
            assert error <= bound, f"grad {i}: max error {error:.3g} exceeds {bound:.3g}"
        else:
            assert_close(got, exp, None if low is None else low[i], factor=3.0, name=f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(203, 45), (100, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_infonce_every_isa(isa, dtype, shape):
    a, b = _features(*shape, dtype, seed=shape[0])
    scale = torch.tensor(14.0, requires_grad=True)
    _check(ops.infonce_loss, reference.infonce_loss, a, b, (scale,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(203, 45), (100, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_siglip_every_isa(isa, dtype, shape):
    a, b = _features(*shape, dtype, seed=shape[1])
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    _check(ops.siglip_loss, reference.siglip_loss, a, b, (scale, bias))
