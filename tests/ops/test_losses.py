"""vlmfast.ops.infonce_loss / siglip_loss against open_clip's formulas (written out below) in
float64, on every backend: odd batch sizes and feature dims, fp16/bf16 at logit scale 100,
opcheck, torch.compile, and each kind of bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import losses as loss_ops
from vlmfast.ops import reference

# (B, D): batch 1, 3, odd sizes that are not a multiple of any block (the C++ tile is 96 rows,
# the Triton test blocks 16), feature dims 7, 64, 512. The Triton interpreter is slow: it gets
# smaller batches.
CASES = {
    "default": [(1, 7), (3, 64), (127, 7), (257, 64), (127, 512)],
    "triton": [(1, 7), (3, 64), (17, 7), (37, 40), (21, 512)],
}


def _case(backend, index):
    return CASES.get(backend.name, CASES["default"])[index]


# ----------------------------------------------------------------------------- oracles


def open_clip_clip_loss(image_features, text_features, logit_scale, normalize=True):
    """open_clip's ClipLoss on one process: logits = scale * n(img) @ n(txt).T; CE both ways / 2."""
    if normalize:
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def open_clip_siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize=True):
    """open_clip's SigLipLoss on one process: -sum(logsigmoid(labels * logits)) / B, labels = 2I - 1."""
    if normalize:
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


ORACLES = {"infonce": open_clip_clip_loss, "siglip": open_clip_siglip_loss}
FUSED = {"infonce": ops.infonce_loss, "siglip": ops.siglip_loss}


def _inputs(B, D, dtype=torch.float32, scale=14.0, bias=-4.0, seed=0):
    """Random (not normalised) features with a shared component so positives stand out, and the
    scale / bias as leaves."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(B, D, generator=g)
    img = (shared + 0.7 * torch.randn(B, D, generator=g)) * 3
    txt = shared + 0.7 * torch.randn(B, D, generator=g)
    return img.to(dtype), txt.to(dtype), torch.tensor(scale), torch.tensor(bias)


def _loss_and_grads(fn, name, img, txt, scale, bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in ((img, txt, scale) if name == "infonce" else (img, txt, scale, bias))]
    loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _check(name, img, txt, scale, bias, **kwargs):
    """The fused loss and its gradients against the float64 oracle (and, in low precision, the
    tolerance rule against the oracle run in the features' dtype)."""
    loss, grads = _loss_and_grads(FUSED[name], name, img, txt, scale, bias, **kwargs)
    as64 = [t.double() for t in (img, txt, scale, bias)]
    loss64, grads64 = _loss_and_grads(ORACLES[name], name, *as64, **kwargs)
    low = low_grads = None
    if img.dtype in (torch.float16, torch.bfloat16):
        low, low_grads = _loss_and_grads(ORACLES[name], name, img, txt, scale, bias, **kwargs)
    assert loss.dtype == img.dtype
    assert_close(loss, loss64, low, name="loss")
    names = ["d image_features", "d text_features", "d logit_scale", "d logit_bias"]
    for i, (grad, grad64) in enumerate(zip(grads, grads64)):
        assert grad.dtype == (img.dtype if i < 2 else scale.dtype)
        if low_grads is not None and i >= 2:
            # A float32 scale / bias fed by low-precision features: the tolerance rule of the
            # features' dtype applies (the float32 bound would demand more than the inputs hold).
            _assert_close_like_low_precision(grad, grad64, low_grads[i], names[i])
        else:
            assert_close(grad, grad64, None if low_grads is None else low_grads[i], factor=3.0, name=names[i])


def _assert_close_like_low_precision(actual, expected64, low, name, factor=3.0):
    error = (actual.double() - expected64).abs().max().item()
    bound = factor * (low.double() - expected64).abs().max().item() + 1e-5 * max(1.0, expected64.abs().max().item())
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert error <= bound, f"{name}: max error {error:.3g} exceeds {bound:.3g}"


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", ["infonce", "siglip"])
@pytest.mark.parametrize("case", range(5))
def test_matches_open_clip_float32(backend, name, case):
    B, D = _case(backend, case)
    _check(name, *_inputs(B, D, seed=case))


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_without_normalisation(backend, name):
    B, D = _case(backend, 3)
    img, txt, scale, bias = _inputs(B, D, scale=1.0, bias=-1.0)
    # Raw features of norm ~ sqrt(D): keep the logits moderate.
    _check(name, img / math.sqrt(D), txt / math.sqrt(D), scale, bias, normalize=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_low_precision_at_scale_100(backend, name, dtype):
    B = 37 if backend.name == "triton" else 200
    img, txt, scale, bias = _inputs(B, 64, dtype, scale=100.0, bias=-10.0)
    _check(name, img, txt, scale, bias)


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_scale_of_shape_one_gets_a_gradient_of_its_shape(backend, name):
    # HF's SigLIP holds logit_scale and logit_bias as shape (1,) parameters.
    img, txt, _, _ = _inputs(5, 16)
    args = [torch.tensor([10.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)]
    args = args[:1] if name == "infonce" else args
    FUSED[name](img, txt, *args).backward()
    args64 = [a.detach().double().requires_grad_() for a in args]
    ORACLES[name](img.double(), txt.double(), *[a.reshape(()) for a in args64]).backward()
    for arg, arg64 in zip(args, args64):
        assert arg.grad.shape == (1,)
        assert_close(arg.grad, arg64.grad, name="d scalar")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_strided_features(backend, name, normalize):
    # The kernels see views: rows of a wider buffer (row stride 2D) and every other column
    # (feature stride 2, copied by the launcher); gradients flow back into the buffers.
    B, D = _case(backend, 3)
    img, txt, scale, bias = _inputs(B, 2 * D, scale=1.0, bias=-1.0)
    img, txt = img / math.sqrt(2 * D), txt / math.sqrt(2 * D)
    views = lambda i, t: (i[:, :D], t[:, ::2])
    assert views(img, txt)[0].stride() == (2 * D, 1)
    args = lambda *rest: rest[:1] if name == "infonce" else rest

    def fused(i, t, *rest):
        return FUSED[name](*views(i, t), *rest, normalize=normalize)

    def oracle(i, t, *rest):
        return ORACLES[name](*views(i, t), *rest, normalize=normalize)

    leaves = [x.clone().requires_grad_() for x in (img, txt, scale, bias)]
    loss = fused(*leaves[:2], *args(*leaves[2:]))
    grads = torch.autograd.grad(loss, leaves[:2] + list(args(*leaves[2:])))
    leaves64 = [x.double().requires_grad_() for x in (img, txt, scale, bias)]
    loss64 = oracle(*leaves64[:2], *args(*leaves64[2:]))
    grads64 = torch.autograd.grad(loss64, leaves64[:2] + list(args(*leaves64[2:])))
    assert_close(loss.detach(), loss64.detach(), name="loss")
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, name="grad")


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_float64_runs_the_reference(name):
    img, txt, scale, bias = (t.double() for t in _inputs(13, 9))
    loss, grads = _loss_and_grads(FUSED[name], name, img, txt, scale, bias)
    expected, expected_grads = _loss_and_grads(ORACLES[name], name, img, txt, scale, bias)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_large_feature_dim(backend):
    B, D = (9, 2048) if backend.name == "triton" else (100, 2048)
    _check("infonce", *_inputs(B, D))


def test_reference_equals_the_written_out_formulas():
    img, txt, scale, bias = (t.double() for t in _inputs(19, 24))
    torch.testing.assert_close(reference.infonce_loss(img, txt, scale), open_clip_clip_loss(img, txt, scale))
    torch.testing.assert_close(reference.siglip_loss(img, txt, scale, bias), open_clip_siglip_loss(img, txt, scale, bias))


def test_fused_matches_logits_materialised_by_hand():
    # An independent check of the reference: CE written with log_softmax on explicit logits.
    img, txt, scale, _ = (t.double() for t in _inputs(11, 8))
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    by_hand = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(ops.infonce_loss(img.float(), txt.float(), scale.float()).double(), by_hand, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- custom-op machinery


def _op_inputs(B=5, D=8, dtype=torch.float32):
    img, txt, scale, bias = _inputs(B, D, dtype)
    a, b = F.normalize(img.float(), dim=1).to(dtype), F.normalize(txt.float(), dim=1).to(dtype)
    return a.requires_grad_(), b.requires_grad_(), scale.requires_grad_(), bias.requires_grad_()


def test_opcheck(backend):
    a, b, scale, bias = _op_inputs()
    torch.library.opcheck(loss_ops.infonce_fwd, (a, b, scale))
    torch.library.opcheck(loss_ops.siglip_fwd, (a, b, scale, bias))
    loss, row_lse, col_lse = loss_ops.infonce_fwd(a.detach(), b.detach(), scale.detach())
    grad = torch.tensor(0.7)
    torch.library.opcheck(loss_ops.infonce_bwd, (grad, a.detach(), b.detach(), scale.detach(), row_lse, col_lse))
    torch.library.opcheck(loss_ops.siglip_bwd, (grad, a.detach(), b.detach(), scale.detach(), bias.detach()))


def test_torch_compile_fullgraph():
    img, txt, scale, bias = _inputs(33, 16)
    leaves = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]

    def both(img, txt, scale, bias):
        return ops.infonce_loss(img, txt, scale) + ops.siglip_loss(img, txt, scale, bias)

    compiled = torch.compile(both, fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]
    eager = both(*eager_leaves)
    eager_grads = torch.autograd.grad(eager, eager_leaves)
    torch.testing.assert_close(loss, eager)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siglip_training_call_forms_the_gradient_in_one_pass(monkeypatch, dtype):
    # On the C++ kernels a siglip_loss that autograd will differentiate runs one pass that forms
    # the loss and its gradient (siglip_fwd_bwd), and the backward only scales what it saved: the
    # loss and the gradients of an upstream gradient other than 1 must equal the two-pass path's
    # (the forward kernel, then the backward kernel given that upstream gradient).
    from vlmfast.runtime import kernel_calls

    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    img, txt, scale, bias = _inputs(131, 40, dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    before = dict(kernel_calls.calls)
    one_pass = ops.siglip_loss(*leaves)
    grads = torch.autograd.grad(one_pass * -2.5, leaves)
    ran = {op for op, n in kernel_calls.calls.items() if n > before.get(op, 0)}
    assert ran == {("siglip_fwd_bwd", "cpp")}

    a, b = (loss_ops._prepare(t.detach().clone().requires_grad_(), True) for t in (img, txt))
    two_pass = loss_ops.siglip_fwd(a, b, scale.clone().requires_grad_(), bias.clone().requires_grad_())
    expected = loss_ops.siglip_bwd(torch.tensor(-2.5), a.detach(), b.detach(), scale, bias)
    torch.testing.assert_close(one_pass, two_pass.to(dtype), rtol=1e-6, atol=0)
    # The feature gradients differ only by the normalisation's chain rule: compare after it.
    a_leaf, b_leaf = leaves[0].detach().clone().requires_grad_(), leaves[1].detach().clone().requires_grad_()
    torch.autograd.backward([loss_ops._prepare(a_leaf, True), loss_ops._prepare(b_leaf, True)],
                            [expected[0], expected[1]])
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(grads[0], a_leaf.grad, rtol=2e-2 if bf16 else 1e-5, atol=1e-3 if bf16 else 1e-7)
    torch.testing.assert_close(grads[1], b_leaf.grad, rtol=2e-2 if bf16 else 1e-5, atol=1e-3 if bf16 else 1e-7)
    torch.testing.assert_close(grads[2], expected[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[3], expected[3], rtol=1e-5, atol=1e-7)

    # Under no_grad (evaluation) only the forward kernel runs.
    before = dict(kernel_calls.calls)
    with torch.no_grad():
        ops.siglip_loss(img, txt, scale, bias)
    assert {op for op, n in kernel_calls.calls.items() if n > before.get(op, 0)} == {("siglip", "cpp")}


def test_outputs_are_poisoned_then_written(backend, monkeypatch):
    # VLMFAST_POISON fills kernel outputs with NaN first: a result with no NaN proves every
    # element of every gradient was written (B = 97 leaves a partial last tile).
    img, txt, scale, bias = _inputs(97 if backend.name != "triton" else 19, 24)
    for name in ("infonce", "siglip"):
        _, grads = _loss_and_grads(FUSED[name], name, img, txt, scale, bias)
        assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- bad input


def _good():
    img, txt, scale, bias = _inputs(4, 8)
    return img, txt, scale, bias


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_mismatched_batch(name):
    img, txt, scale, bias = _good()
    args = (scale,) if name == "infonce" else (scale, bias)
    with pytest.raises(ValueError, match=r"text_features: expected \(B, D\) = \(4, 8\) like image_features, got \(3, 8\)"):
        FUSED[name](img, txt[:3], *args)


def test_mismatched_feature_dim():
    img, txt, scale, _ = _good()
    with pytest.raises(ValueError, match=r"text_features: expected \(B, D\) = \(4, 8\) like image_features, got \(4, 5\)"):
        ops.infonce_loss(img, txt[:, :5], scale)


def test_wrong_rank():
    img, txt, scale, _ = _good()
    with pytest.raises(ValueError, match=r"image_features: expected \(B, D\), got \(2, 2, 8\)"):
        ops.infonce_loss(img.reshape(2, 2, 8), txt, scale)


@pytest.mark.parametrize("bad", [torch.ones(2), torch.ones(1, 1)])
def test_non_scalar_scale(bad):
    img, txt, _, bias = _good()
    with pytest.raises(ValueError, match=r"logit_scale: expected a scalar tensor, shape \(\) or \(1,\), got \("):
        ops.infonce_loss(img, txt, bad)
    with pytest.raises(ValueError, match=r"logit_bias: expected a scalar tensor"):
        ops.siglip_loss(img, txt, torch.tensor(1.0), bad)


def test_empty_batch():
    img, txt, scale, _ = _good()
    with pytest.raises(ValueError, match=r"image_features: expected \(B, D\) with B >= 1 and D >= 1 .*got \(0, 8\)"):
        ops.infonce_loss(img[:0], txt[:0], scale)


def test_integer_features():
    img, txt, scale, bias = _good()
    with pytest.raises(TypeError, match=r"image_features: expected a float32, float16, bfloat16 or float64 tensor, got torch.int64"):
        ops.siglip_loss(img.long(), txt.long(), scale, bias)


def test_mismatched_dtypes():
    img, txt, scale, _ = _good()
    with pytest.raises(TypeError, match=r"text_features: expected torch.float32 like image_features, got torch.float16"):
        ops.infonce_loss(img, txt.half(), scale)


def test_device_mix():
    img, txt, _, _ = _good()
    with pytest.raises(ValueError, match=r"logit_scale: expected a tensor on cpu like image_features, got meta"):
        ops.infonce_loss(img, txt, torch.tensor(1.0, device="meta"))


def test_scale_not_a_tensor():
    img, txt, _, _ = _good()
    with pytest.raises(TypeError, match=r"logit_scale: expected a torch.Tensor, got float"):
        ops.infonce_loss(img, txt, 14.0)
