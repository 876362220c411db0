"""patch_embed: every backend against the float64 reference and conv2d, gradients, op contract,
bad input."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)

# (B, H, W, C, p, D, uint8 images, normalise): non-square grids, p 14/16/32, B 1 and 3,
# C 1/3/4, D 7/64; small enough for the Triton interpreter.
CASES = [
    (1, 32, 48, 3, 16, 64, True, True),     # 2 x 3 grid, CLIP-style uint8 input
    (3, 28, 42, 4, 14, 7, False, True),     # float images, 4 channels, odd D
    (1, 64, 32, 1, 32, 64, True, False),    # grey uint8, scaled by 1/255 only
    (3, 16, 16, 3, 16, 7, False, False),    # one patch per image
]


def _inputs(case, dtype, generator):
    batch, height, width, channels, patch, d, as_uint8, normalise = case
    if as_uint8:
        images = torch.randint(0, 256, (batch, height, width, channels), dtype=torch.uint8, generator=generator)
    else:
        images = torch.randn(batch, channels, height, width, generator=generator).to(dtype)
    weight = (torch.randn(d, channels, patch, patch, generator=generator) * 0.05).to(dtype)
    bias = torch.randn(d, generator=generator).to(dtype)
    mean = (torch.rand(channels, generator=generator) * 0.6 + 0.2).tolist() if normalise else None
    std = (torch.rand(channels, generator=generator) * 0.3 + 0.15).tolist() if normalise else None
    return images, weight, bias, mean, std


def _run(fn, images, weight, bias, grad, dtype):
    """(out, grad_weight, grad_bias, grad_images or None) of fn with every input cast to dtype."""
    x = images if images.dtype == torch.uint8 else images.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_()
    out = fn(x, w, b)
    out.backward(grad.to(dtype))
    return [out.detach(), w.grad, b.grad, None if x.dtype == torch.uint8 else x.grad]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("-u8" if c[6] else "-float"))
def test_patch_embed_matches_reference(backend, dtype, case):
    generator = torch.Generator().manual_seed(hash(case) % 2**31)
    images, weight, bias, mean, std = _inputs(case, dtype, generator)
    images, weight, bias = images.to(backend.device), weight.to(backend.device), bias.to(backend.device)
    batch, height, width, _, patch, d = case[:6]
    grad = torch.randn(batch, (height // patch) * (width // patch), d, generator=generator).to(backend.device)

    def fused(x, w, b):
        return ops.patch_embed(x, w, b, mean=mean, std=std)

    def ref(x, w, b):
        return reference.patch_embed(x, w, b, mean, std)

    got = _run(fused, images, weight, bias, grad, dtype)
    exact = _run(ref, images, weight, bias, grad, torch.float64)
    low = _run(ref, images, weight, bias, grad, dtype)
    for i, name in enumerate(["out", "grad_weight", "grad_bias", "grad_images"]):
        if exact[i] is None:
            assert got[i] is None
            continue
        assert got[i].dtype == dtype, name
        assert_close(got[i], exact[i], low[i], factor=2.0 if i == 0 else 3.0, name=name)


def test_float32_equals_conv2d_on_normalised_images(backend):
    """The API's formula, written with torch ops, in float32."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 32, 48, 3), dtype=torch.uint8, generator=generator).to(backend.device)
    weight = torch.randn(64, 3, 16, 16, generator=generator).to(backend.device) * 0.02
    bias = torch.randn(64, generator=generator).to(backend.device)
    mean = torch.tensor(CLIP_MEAN, device=backend.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=backend.device).view(1, 3, 1, 1)
    normalised = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    expected = F.conv2d(normalised, weight, bias, stride=16).flatten(2).transpose(1, 2)
    got = ops.patch_embed(images, weight, bias, mean=CLIP_MEAN, std=CLIP_STD)
    assert got.shape == (3, 6, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("as_float", [False, True], ids=["u8", "float"])
def test_float32_near_the_mean_with_positive_weights(backend, as_float):
    """The worst case for folding the normalisation into the weights: images at the mean (x_n
    about 0), a small std and all-positive weights make sum W' x and the folded bias two large
    terms that cancel. The result must still meet the float32 rule."""
    generator = torch.Generator().manual_seed(5)
    mean, std = (0.5, 0.45, 0.4), (0.05, 0.05, 0.05)
    images = (torch.tensor(mean) * 255).round().to(torch.uint8).view(1, 1, 1, 3).repeat(2, 32, 32, 1)
    images[:, ::7] += 1
    if as_float:
        images = images.permute(0, 3, 1, 2).float() / 255
    weight = torch.rand(64, 3, 16, 16, generator=generator) * 0.05
    bias = torch.randn(64, generator=generator)
    images, weight, bias = images.to(backend.device), weight.to(backend.device), bias.to(backend.device)
    got = ops.patch_embed(images, weight, bias, mean=mean, std=std)
    exact_images = images if images.dtype == torch.uint8 else images.double()
    assert_close(got, reference.patch_embed(exact_images, weight.double(), bias.double(), mean, std))


def test_strided_float_images_need_no_copy(backend):
    """Channels-last float images and a crop (a view with gaps) give the contiguous answer."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 40, 56, generator=generator).to(backend.device)
    weight = torch.randn(7, 3, 8, 8, generator=generator).to(backend.device)
    for images in (base.contiguous(memory_format=torch.channels_last), base[:, :, 4:36, 8:48]):
        got = ops.patch_embed(images, weight)
        assert_close(got, reference.patch_embed(images.double(), weight.double()))


def test_uint8_view_and_tensor_mean_std(backend):
    """uint8 crops of a larger decoded image; mean/std as tensors on the images' device."""
    generator = torch.Generator().manual_seed(2)
    full = torch.randint(0, 256, (2, 50, 70, 3), dtype=torch.uint8, generator=generator).to(backend.device)
    images = full[:, 1:49, 3:67]  # 48 x 64
    weight = torch.randn(64, 3, 16, 16, generator=generator).to(backend.device) * 0.05
    mean, std = torch.tensor(CLIP_MEAN, device=backend.device), torch.tensor(CLIP_STD, device=backend.device)
    got = ops.patch_embed(images, weight, mean=mean, std=std)
    assert_close(got, reference.patch_embed(images, weight.double(), None, CLIP_MEAN, CLIP_STD))


def test_no_bias_and_weight_only_gradient(backend):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (1, 28, 28, 3), dtype=torch.uint8, generator=generator).to(backend.device)
    weight = torch.randn(7, 3, 14, 14, generator=generator).to(backend.device).requires_grad_()
    out = ops.patch_embed(images, weight)
    out.square().sum().backward()
    w64 = weight.detach().double().requires_grad_()
    reference.patch_embed(images, w64).square().sum().backward()
    assert_close(weight.grad, w64.grad, name="grad_weight")


@pytest.mark.parametrize("as_uint8", [True, False], ids=["u8", "float"])
def test_weight_gradient_over_many_rows(backend, as_uint8):
    """More patch rows than one chunk of the C++ weight-gradient reduction (128), K = 196 not a
    multiple of its column block (96), D = 40 not a multiple of its 32-column panels."""
    generator = torch.Generator().manual_seed(6)
    if as_uint8:
        images = torch.randint(0, 256, (3, 84, 140, 1), dtype=torch.uint8, generator=generator)
    else:
        images = torch.randn(3, 1, 84, 140, generator=generator)
    images = images.to(backend.device)
    weight = torch.randn(40, 1, 14, 14, generator=generator).to(backend.device).requires_grad_()
    bias = torch.randn(40, generator=generator).to(backend.device).requires_grad_()
    grad = torch.randn(3, 60, 40, generator=generator).to(backend.device)
    ops.patch_embed(images, weight, bias, mean=(0.3,), std=(0.2,)).backward(grad)
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    exact_images = images if as_uint8 else images.double()
    reference.patch_embed(exact_images, w64, b64, (0.3,), (0.2,)).backward(grad.double())
    assert_close(weight.grad, w64.grad, name="grad_weight")
    assert_close(bias.grad, b64.grad, name="grad_bias")


def test_empty_batch():
    """No patches: the op computes the empty result without a kernel (so no backend fixture)."""
    images = torch.zeros(0, 32, 32, 3, dtype=torch.uint8)
    weight = torch.randn(8, 3, 16, 16)
    assert ops.patch_embed(images, weight, mean=CLIP_MEAN, std=CLIP_STD).shape == (0, 4, 8)


def test_float64_runs_the_reference():
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    weight = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    got = ops.patch_embed(images, weight, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(got, reference.patch_embed(images, weight, None, CLIP_MEAN, CLIP_STD))


# --------------------------------------------------------------------------- op contract


def test_opcheck_patch_ops():
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8, generator=generator)
    float_images = torch.randn(2, 3, 32, 48, generator=generator, requires_grad=True)
    weight = torch.randn(6, 3, 16, 16, generator=generator, requires_grad=True)
    bias = torch.randn(6, generator=generator, requires_grad=True)
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    op = torch.ops.vlmfast.patch_embed_fwd.default
    torch.library.opcheck(op, (images, weight, bias, scale, shift))
    torch.library.opcheck(op, (float_images, weight, None, scale, shift))
    torch.library.opcheck(torch.ops.vlmfast.patch_gather.default, (images, 16, scale, shift, torch.float32))
    grad = torch.randn(2 * 6, 6, generator=generator)
    torch.library.opcheck(torch.ops.vlmfast.patch_weight_grad.default, (grad, images, 16, scale, shift))
    torch.library.opcheck(torch.ops.vlmfast.patch_weight_grad.default, (grad, float_images.detach(), 16, scale, shift))


def test_torch_compile_fullgraph():
    def embed(images, weight, bias):
        return ops.patch_embed(images, weight, bias, mean=CLIP_MEAN, std=CLIP_STD).mean(dim=1)

    compiled = torch.compile(embed, fullgraph=True)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    weight = torch.randn(16, 3, 16, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    out = compiled(images, weight, bias)
    torch.testing.assert_close(out, embed(images, weight, bias))
    # The compiled graph trains too: its backward runs the registered gradient ops.
    out.square().sum().backward()
    compiled_grads = weight.grad, bias.grad
    weight.grad = bias.grad = None
    embed(images, weight, bias).square().sum().backward()
    torch.testing.assert_close(compiled_grads, (weight.grad, bias.grad))


# --------------------------------------------------------------------------- bad input

U8 = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
W = torch.zeros(8, 3, 16, 16)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((torch.zeros(2, 30, 32, 3, dtype=torch.uint8), W), {}, ValueError,
         r"images: H and W must be multiples of the patch size p = 16, got H = 30, W = 32"),
        ((torch.zeros(2, 3, 32, 40), W), {}, ValueError,
         r"images: H and W must be multiples of the patch size p = 16, got H = 32, W = 40"),
        ((torch.zeros(2, 32, 32, 4, dtype=torch.uint8), W), {}, ValueError,
         r"images: expected \(B, H, W, C\) uint8 with C = weight.shape\[1\] = 3, got \(2, 32, 32, 4\)"),
        ((torch.zeros(2, 1, 32, 32), W), {}, ValueError,
         r"images: expected \(B, C, H, W\) float with C = weight.shape\[1\] = 3, got \(2, 1, 32, 32\)"),
        ((torch.zeros(2, 3, 32, 32, dtype=torch.uint8), W), {}, ValueError,
         r"uint8 images are read channels-last \(B, H, W, C\), as decoded; got \(2, 3, 32, 32\), which looks like \(B, C, H, W\)"),
        ((U8, W), {"mean": (0.5, 0.5), "std": (0.2, 0.2)}, ValueError,
         r"mean: expected 3 values \(one per channel, C = weight.shape\[1\]\), got shape \(2\)"),
        ((U8, W), {"mean": (0.5, 0.5, 0.5), "std": torch.ones(4)}, ValueError, r"std: expected 3 values"),
        ((U8, W), {"mean": (0.5, 0.5, 0.5)}, ValueError, r"mean, std: pass both"),
        ((U8, W), {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, ValueError, r"std: expected non-zero values"),
        ((U8, W), {"mean": "rgb", "std": (1, 1, 1)}, TypeError, r"mean: expected a sequence or tensor of 3 numbers"),
        ((torch.zeros(32, 32, 3, dtype=torch.uint8), W), {}, ValueError, r"images: expected \(B, H, W, C\) uint8"),
        ((torch.zeros(3, 32, 32), W), {}, ValueError, r"images: expected \(B, C, H, W\) float"),
        ((U8, torch.zeros(8, 768)), {}, ValueError, r"weight: expected \(D, C, p, p\) like a Conv2d weight, got \(8, 768\)"),
        ((U8, torch.zeros(8, 3, 16, 8)), {}, ValueError, r"weight: expected \(D, C, p, p\) with a square p x p kernel, got \(8, 3, 16, 8\)"),
        ((U8, W.long()), {}, TypeError, r"weight: expected a float32, float16, bfloat16 or float64 tensor, got torch.int64"),
        ((torch.zeros(2, 3, 32, 32, dtype=torch.float16), W), {}, TypeError,
         r"images: expected uint8 or weight's dtype torch.float32, got torch.float16"),
        ((torch.zeros(2, 3, 32, 32, dtype=torch.int32), W), {}, TypeError,
         r"images: expected uint8 \(B, H, W, C\) or float \(B, C, H, W\), got torch.int32"),
        ((U8, W, torch.zeros(7)), {}, ValueError, r"bias: expected \(D,\) = \(8,\), got \(7\)"),
        ((U8, W, torch.zeros(8, dtype=torch.float16)), {}, TypeError, r"bias: expected weight's dtype torch.float32"),
        ((U8, W.to("meta")), {}, ValueError, r"weight: expected a tensor on cpu like images, got meta"),
        ((U8.numpy(), W), {}, TypeError, r"images: expected a torch.Tensor, got ndarray"),
    ],
)
def test_patch_embed_rejects(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.patch_embed(*args, **kwargs)


def test_numeric_mean_std_make_the_affine_once():
    """mean / std given as numbers: the (scale, shift) pair is formed on the host in float64 once
    and reused (no host-to-device copy or read-back per call, so a CUDA-graph capture of the op
    has none), equal to the float64 formula rounded once."""
    import importlib

    patch_embed_op = importlib.import_module("vlmfast.ops.patch_embed")  # the module, not the function

    images = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    first = patch_embed_op._affine(images, 3, mean, std, torch.float32)
    again = patch_embed_op._affine(images, 3, list(mean), list(std), torch.float32)
    assert all(a is b for a, b in zip(first, again))
    std64, mean64 = torch.tensor(std, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64)
    assert torch.equal(first[0], (1 / (255 * std64)).float()) and torch.equal(first[1], (-mean64 / std64).float())
    with pytest.raises(ValueError, match=r"std: expected non-zero values"):
        patch_embed_op._affine(images, 3, mean, (0.2, 0.0, 0.2), torch.float32)
