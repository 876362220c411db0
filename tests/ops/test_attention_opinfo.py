"""The drop-in on the peer's own cases: every sample of torch's OpInfo for
nn.functional.scaled_dot_product_attention (3-D and 4-D inputs, query and key whose batch dims
broadcast, causal with L != S, dropout, a float mask) through ops.scaled_dot_product_attention,
against torch's SDPA: forward, and backward where the sample requires grad. Every dtype the
OpInfo lists on the CPU; the float ones on the C++ backend and the reference.

Values follow DESIGN.md's tolerance rule (tests/tolerance.py): the truth is torch's SDPA in
float64; float32 within 1e-5 relative; float16 / bfloat16 within 2x (3x for gradients) of the
error of torch's own fused CPU kernel in that precision. (Not of the plain formula run in 16
bits: on these samples, values up to 9 and so near one-hot softmaxes, the flash-attention
backward's D = rowsum(dO * O) from the rounded O is up to ~4.6x that formula's gradient error,
in torch's kernel as in ours.) Samples with dropout go to torch's SDPA: with the same seed the
result is torch's, bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import BACKENDS
from tests.tolerance import assert_close
from vlmfast import ops

# torch's OpInfo database (it needs expecttest, in the [test] extra); ~5 s to import.
from torch.testing._internal import common_methods_invocations  # noqa: E402

OPINFO = next(o for o in common_methods_invocations.op_db if o.name == "nn.functional.scaled_dot_product_attention")
KERNEL_BACKENDS = [p for p in BACKENDS if p[1] == "cpu" and p[0] in ("cpp", "reference")]
KERNEL_DTYPES = sorted((d for d in OPINFO.supported_dtypes("cpu") if d != torch.float64), key=str)


def _samples(dtype, requires_grad):
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return list(OPINFO.sample_inputs("cpu", dtype, requires_grad=requires_grad))


def _leaves(sample, dtype=None):
    """Fresh leaves (query, key, value, kwargs) of a sample, optionally in another dtype."""
    tensors = [sample.input, *sample.args]
    kwargs = dict(sample.kwargs)
    convert = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    leaves = [convert(t).requires_grad_(t.requires_grad) for t in tensors]
    mask = kwargs.get("attn_mask")
    if mask is not None:
        kwargs["attn_mask"] = convert(mask).requires_grad_(mask.requires_grad)
    return leaves, kwargs


def _run(fn, sample, dtype=None, grad=None):
    """(out, [input gradients]) of fn on fresh copies of the sample's tensors."""
    leaves, kwargs = _leaves(sample, dtype)
    differentiable = leaves + ([kwargs["attn_mask"]] if "attn_mask" in kwargs else [])
    differentiable = [t for t in differentiable if t.requires_grad]
    out = fn(*leaves, **kwargs)
    if not differentiable or grad is None:
        return out.detach(), []
    grads = torch.autograd.grad(out, differentiable, grad.to(out.dtype))
    return out.detach(), list(grads)


def _torch_fused_layout(query, key, value, **kwargs):
    """torch's SDPA on the same values laid out (B, H, L, E), where its CPU kernel for 16-bit
    inputs is the fused one (for 3-D inputs torch takes a float32 math path instead)."""
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (query, key, value))
    if q.dim() == 3:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.reshape(*batch, *out.shape[-2:])


def _check_sample(sample, dtype):
    if sample.kwargs.get("dropout_p", 0.0) > 0:
        # torch's path with torch's random numbers: equal to torch, given the same seed.
        grad = torch.randn(*_run(F.scaled_dot_product_attention, sample)[0].shape) if sample.input.requires_grad else None
        torch.manual_seed(1)
        ours = _run(ops.scaled_dot_product_attention, sample, grad=grad)
        torch.manual_seed(1)
        theirs = _run(F.scaled_dot_product_attention, sample, grad=grad)
        for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return
    exact_out = _run(F.scaled_dot_product_attention, sample, torch.float64)[0]
    grad = torch.randn(exact_out.shape, generator=torch.Generator().manual_seed(2))
    out, grads = _run(ops.scaled_dot_product_attention, sample, grad=grad)
    exact = _run(F.scaled_dot_product_attention, sample, torch.float64, grad)
    low = (None, [None] * len(grads))
    if dtype not in (torch.float32, torch.float64):
        low = _run(_torch_fused_layout, sample, grad=grad)
    assert out.shape == exact[0].shape and out.dtype == dtype
    assert_close(out, exact[0], low[0])
    assert len(grads) == len(exact[1])
    for i, (g, g64, g_low) in enumerate(zip(grads, exact[1], low[1])):
        assert_close(g, g64, g_low, factor=3.0, name=f"gradient {i}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
def test_opinfo_samples_equal_torch(backend, dtype, requires_grad):
    samples = _samples(dtype, requires_grad)
    assert len(samples) >= 20  # the OpInfo's 3 layouts x causal x dropout x gqa flag, + a mask
    assert any(s.input.dim() != s.args[0].dim() for s in samples)  # the broadcast case is there
    for i, sample in enumerate(samples):
        try:
            _check_sample(sample, dtype)
        except Exception as error:
            shapes = [tuple(t.shape) for t in (sample.input, *sample.args)]
            raise AssertionError(f"sample {i}: {shapes} {sample.kwargs}: {error}") from error


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
def test_opinfo_samples_equal_torch_float64(requires_grad):
    """float64 runs the reference on every backend: the same samples, to 1e-5."""
    for sample in _samples(torch.float64, requires_grad):
        _check_sample(sample, torch.float64)
