"""The float32 RMSNorm kernels (csrc/cpu/rms_norm.cpp) behind the Llama decoders' norm in training
steps: output and both gradients against the float64 composite, at widths that are and are not
multiples of the 16-lane vectors, one and two threads; the composite where no gradient is wanted
or the dtype is not float32."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast.models.smolvlm import _ops
from vlmfast.runtime import kernel_calls


def _reference(x, w, eps):
    x64 = x.double()
    return w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 7, 576), (3, 37), (1, 16), (5, 1, 100)], ids=str)
def test_forward_and_gradients_equal_the_float64_composite(shape, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=g)).requires_grad_()
    w = torch.randn(shape[-1], generator=g).requires_grad_()
    before = kernel_calls.calls[("rms_norm", "cpp")], kernel_calls.calls[("rms_norm_bwd", "cpp")]
    out = _ops.rms_norm(x, w, 1e-5)
    grad = torch.randn(shape, generator=g)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    assert (kernel_calls.calls[("rms_norm", "cpp")], kernel_calls.calls[("rms_norm_bwd", "cpp")]) == \
        (before[0] + 1, before[1] + 1)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = _reference(x64, w64, 1e-5)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), grad.double())
    assert out.dtype == dx.dtype == dw.dtype == torch.float32
    assert_close(out, want)
    assert_close(dx, want_dx, name="grad x")
    assert_close(dw, want_dw, name="grad weight")


def test_one_gradient_alone():
    # a frozen norm in a trained stack (the weight's gradient not wanted) and the reverse
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 40, generator=g), torch.randn(40, generator=g)
    grad = torch.randn(4, 40, generator=g)
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(_ops.rms_norm(xg, w, 1e-6), (xg,), grad)
    wg = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(_ops.rms_norm(x, wg, 1e-6), (wg,), grad)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want_dx, want_dw = torch.autograd.grad(_reference(x64, w64, 1e-6), (x64, w64), grad.double())
    assert_close(dx, want_dx, name="grad x")
    assert_close(dw, want_dw, name="grad weight")


def test_composite_without_gradients_or_in_bf16():
    x, w = torch.randn(3, 24), torch.randn(24)
    before = kernel_calls.calls[("rms_norm", "cpp")]
    with torch.no_grad():
        assert_close(_ops.rms_norm(x.requires_grad_(), w, 1e-5), _reference(x.detach(), w, 1e-5))
    xb = x.detach().bfloat16().requires_grad_()
    out = _ops.rms_norm(xb, w.bfloat16(), 1e-5)
    assert out.dtype == torch.bfloat16
    assert kernel_calls.calls[("rms_norm", "cpp")] == before
