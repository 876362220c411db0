"""Patch embedding straight from decoded images: normalise + patchify + GEMM + bias in one kernel.

    tokens = patch_embed(images_uint8_bhwc, weight, bias, mean=MEAN, std=STD)   # (B, N, D)

equals conv2d(normalised, weight, bias, stride=p).flatten(2).transpose(1, 2) with
normalised = (images.permute(0, 3, 1, 2) / 255 - mean) / std, without materialising any of it.

Layers: public function (validates, turns mean/std into a per-channel affine x * scale + shift)
-> custom op `vlmfast::patch_embed_fwd` (fake impl + autograd) -> backend:
  cpp:    csrc/cpu/patch_embed.cpp, the affine folded into the weight and bias, patches packed
          from the image inside the GEMM (vlmfast/native/patch_embed.py);
  triton: kernels/patch_embed.py, the patch tile gathered and normalised in the GEMM's K loop;
  cuda:   csrc/cuda/patch_embed.cu gathers normalised patches (B * N, C * p * p) in the weight's
          dtype, then torch.addmm (cuBLAS) runs the GEMM;
  reference: ops/reference.py.
The backward: the weight gradient grad^T @ patches is `vlmfast::patch_weight_grad` (C++: one
kernel packing the patches from the image inside the GEMM; elsewhere `vlmfast::patch_gather`
then a matmul), the bias gradient a sum, the float images' gradient grad @ W scattered back.
"""

from collections.abc import Sequence

import torch

from vlmfast.ops import _checks, _dispatch, _eager, reference
from vlmfast.runtime.layout import channels_first

# ----------------------------------------------------------------------------- custom ops


def _grid(images: torch.Tensor, patch: int) -> tuple[int, int, int, int]:
    """(B, C, H / p, W / p) of uint8 (B, H, W, C) or float (B, C, H, W) images."""
    b, c, h, w = channels_first(images).shape
    return b, c, h // patch, w // patch


@torch.library.custom_op("vlmfast::patch_gather", mutates_args=())
def patch_gather(
    images: torch.Tensor, patch: int, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(B * N, C * p * p) normalised patches x * scale[c] + shift[c] in `dtype`, raster order,
    columns (c, i, j) like a flattened Conv2d weight."""
    backend = _dispatch.select("patch_gather", images.device, dtype)
    if images.numel() == 0:
        backend = "reference"
    if backend == "triton":
        from vlmfast.kernels import patch_embed as triton_patch_embed

        return triton_patch_embed.gather(images, patch, scale, shift, dtype)
    if backend in ("cpp", "cuda"):
        from vlmfast.native import patch_embed as native_patch_embed

        return native_patch_embed.gather(images, patch, scale, shift, dtype)
    _dispatch.record("patch_gather", "reference")
    return reference.patch_gather(images, patch, scale, shift, dtype)


@patch_gather.register_fake
def _(images, patch, scale, shift, dtype):
    b, c, gh, gw = _grid(images, patch)
    return images.new_empty(b * gh * gw, c * patch * patch, dtype=dtype)


@torch.library.custom_op("vlmfast::patch_weight_grad", mutates_args=())
def patch_weight_grad(
    grad: torch.Tensor, images: torch.Tensor, patch: int, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """(D, C * p * p) in grad's dtype: grad (B * N, D)^T @ the normalised patches, the weight
    gradient of the conv. C++: one fused kernel (patches packed from the image inside the GEMM);
    elsewhere the patches are gathered, then one matmul."""
    backend = _dispatch.select("patch_weight_grad", grad.device, grad.dtype)
    if backend == "cpp" and grad.numel() > 0:
        from vlmfast.native import patch_embed as native_patch_embed

        return native_patch_embed.weight_grad(grad, images, patch, scale, shift)
    # No fused kernel here: the gather (itself dispatched) and one matmul.
    return grad.T @ patch_gather(images, patch, scale, shift, grad.dtype)


@patch_weight_grad.register_fake
def _(grad, images, patch, scale, shift):
    _, c, _, _ = _grid(images, patch)
    return grad.new_empty(grad.shape[1], c * patch * patch)


@torch.library.custom_op("vlmfast::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(
    images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """(B, N, D) in weight's dtype: patches normalised as x * scale[c] + shift[c], times weight,
    plus bias."""
    return _embed(images, weight, bias, scale, shift)


def _embed(images, weight, bias, scale, shift) -> torch.Tensor:
    """patch_embed_fwd's body (also run directly by plain inference calls, ops/_eager.py)."""
    backend = _dispatch.select("patch_embed", weight.device, weight.dtype)
    patch = weight.shape[-1]
    b, _, gh, gw = _grid(images, patch)
    empty = images.numel() == 0 or weight.shape[0] == 0
    if backend == "triton" and not empty:
        from vlmfast.kernels import patch_embed as triton_patch_embed

        return triton_patch_embed.forward(images, weight, bias, scale, shift)
    if backend == "cpp" and not empty:
        from vlmfast.native import patch_embed as native_patch_embed

        return native_patch_embed.forward(images, weight, bias, scale, shift)
    if backend == "cuda" and not empty:
        from vlmfast.native import patch_embed as native_patch_embed

        patches = native_patch_embed.gather(images, patch, scale, shift, weight.dtype)
    else:
        _dispatch.record("patch_embed", "reference")
        patches = reference.patch_gather(images, patch, scale, shift, weight.dtype)
    return _patch_gemm(patches, weight, bias, b, gh * gw)


def _patch_gemm(patches, weight, bias, batch: int, tokens: int) -> torch.Tensor:
    """(B * N, K) patches @ weight (D, K)^T + bias -> (B, N, D)."""
    flat = weight.reshape(weight.shape[0], -1)
    out = patches @ flat.T if bias is None else torch.addmm(bias, patches, flat.T)
    return out.reshape(batch, tokens, weight.shape[0])


@patch_embed_fwd.register_fake
def _(images, weight, bias, scale, shift):
    b, _, gh, gw = _grid(images, weight.shape[-1])
    return weight.new_empty(b, gh * gw, weight.shape[0])


def _setup_context(ctx, inputs, output):
    images, weight, bias, scale, shift = inputs
    ctx.save_for_backward(images, weight, scale, shift)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    images, weight, scale, shift = ctx.saved_tensors
    d, patch = weight.shape[0], weight.shape[-1]
    grad_rows = grad.reshape(-1, d)  # (B * N, D)
    grad_images = grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        # dW = grad^T @ normalised patches (the affine is inside the patches, so this is the
        # gradient of the conv weight itself, not of any folded weight).
        grad_weight = patch_weight_grad(grad_rows, images, patch, scale, shift).view_as(weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_rows.sum(0)
    if ctx.needs_input_grad[0]:
        # d images = unpatchify(grad @ W) * scale[c]  (float images only: x_n = x * scale + shift)
        b, c, gh, gw = _grid(images, patch)
        grad_patches = grad_rows @ weight.reshape(d, -1)
        grad_images = reference.unpatchify(grad_patches, b, c, gh * patch, gw * patch, patch)
        grad_images = grad_images * scale.to(grad_images.dtype).view(1, -1, 1, 1)
    return grad_images, grad_weight, grad_bias, None, None


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _channel_values(name: str, value, channels: int, device, dtype) -> torch.Tensor:
    """mean / std as a (C,) tensor of `dtype` on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected real per-channel values, got {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name}: expected a tensor on {device} like images, got {value.device}")
        values = value.detach().to(device=device, dtype=dtype)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            values = torch.tensor([float(v) for v in value], dtype=dtype, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected {channels} numbers (one per channel), got {value!r}") from None
    else:
        raise TypeError(f"{name}: expected a sequence or tensor of {channels} numbers, got {type(value).__name__}")
    if values.dim() != 1 or values.shape[0] != channels:
        raise ValueError(
            f"{name}: expected {channels} values (one per channel, C = weight.shape[1]), got shape {_checks.shape_of(values)}"
        )
    return values


# (mean, std, range, device, dtype) -> (scale, shift) for mean / std given as numbers: formed on
# the host once and kept, so a call (a CUDA-graph capture too) neither copies to the device nor
# reads a check back from it.
_NUMBER_AFFINES: dict = {}


def _affine(images, channels: int, mean, std, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (C,) each: normalised = x * scale + shift, formed in float64 then rounded.
    uint8: scale = 1 / (255 std), shift = -mean / std; float: scale = 1 / std."""
    if (mean is None) != (std is None):
        raise ValueError("mean, std: pass both (per-channel normalisation) or neither")
    range_scale = 255.0 if images.dtype == torch.uint8 else 1.0
    if mean is None:
        scale = torch.full((channels,), 1.0 / range_scale, dtype=torch.float64, device=images.device)
        shift = torch.zeros(channels, dtype=torch.float64, device=images.device)
        return scale.to(dtype), shift.to(dtype)
    on_host = not isinstance(mean, torch.Tensor) and not isinstance(std, torch.Tensor)
    key = None
    if on_host:
        try:
            key = (tuple(mean), tuple(std), range_scale, images.device, dtype)
            cached = _NUMBER_AFFINES.get(key)
        except TypeError:  # not hashable: checked (and named) below
            key = cached = None
        if cached is not None:
            return cached
    device = torch.device("cpu") if on_host else images.device
    mean64 = _channel_values("mean", mean, channels, device, torch.float64)
    std64 = _channel_values("std", std, channels, device, torch.float64)
    # The check reads the values: skipped under torch.compile and CUDA-graph capture.
    capturing = std64.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and not bool((std64 != 0).all()):
        raise ValueError(f"std: expected non-zero values, got {std64.tolist()}")
    scale = 1.0 / (range_scale * std64)
    shift = -mean64 / std64
    affine = scale.to(images.device, dtype), shift.to(images.device, dtype)
    if key is not None:
        if len(_NUMBER_AFFINES) >= 64:
            _NUMBER_AFFINES.clear()
        _NUMBER_AFFINES[key] = affine
    return affine


def _validate(images, weight, bias) -> None:
    _checks.tensor("images", images)
    _checks.floating("weight", weight)
    _checks.rank("weight", weight, 4, "(D, C, p, p) like a Conv2d weight")
    d, channels, ph, pw = weight.shape
    if ph != pw or ph == 0:
        raise ValueError(f"weight: expected (D, C, p, p) with a square p x p kernel, got {_checks.shape_of(weight)}")
    patch = ph
    if images.dtype == torch.uint8:
        layout = f"(B, H, W, C) uint8 with C = weight.shape[1] = {channels}"
        _checks.rank("images", images, 4, layout)
        if images.shape[-1] != channels:
            if images.shape[1] == channels:
                raise ValueError(
                    f"images: uint8 images are read channels-last (B, H, W, C), as decoded; got "
                    f"{_checks.shape_of(images)}, which looks like (B, C, H, W): pass "
                    f"images.permute(0, 2, 3, 1), or float (B, C, H, W) images"
                )
            raise ValueError(f"images: expected {layout}, got {_checks.shape_of(images)}")
        height, width = images.shape[1], images.shape[2]
    elif images.dtype in _checks.FLOAT_DTYPES:
        layout = f"(B, C, H, W) float with C = weight.shape[1] = {channels}"
        _checks.rank("images", images, 4, layout)
        if images.shape[1] != channels:
            raise ValueError(f"images: expected {layout}, got {_checks.shape_of(images)}")
        if images.dtype != weight.dtype:
            raise TypeError(f"images: expected uint8 or weight's dtype {weight.dtype}, got {images.dtype}")
        height, width = images.shape[2], images.shape[3]
    else:
        raise TypeError(f"images: expected uint8 (B, H, W, C) or float (B, C, H, W), got {images.dtype}")
    if height % patch or width % patch:
        raise ValueError(
            f"images: H and W must be multiples of the patch size p = {patch}, got H = {height}, W = {width}"
        )
    if bias is not None:
        _checks.bias(bias, d, "D", weight)
    _checks.same_device(images=images, weight=weight, **({"bias": bias} if bias is not None else {}))


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding (ViT's first layer) from decoded images, normalisation included.

    Arguments:
        images: uint8 (B, H, W, C) as decoded (channels last; uint8 always means this layout,
            values scaled by 1/255), or float (B, C, H, W) of weight's dtype. H and W multiples
            of p.
        weight: (D, C, p, p), a Conv2d weight with a square kernel; float32, float16, bfloat16
            (float64 runs the reference).
        bias: (D,) of weight's dtype, or None.
        mean, std: per-channel normalisation (length C, sequences or tensors), both or neither:
            normalised = (x - mean) / std after the 1/255 of uint8 images.
    Returns:
        (B, N, D) in weight's dtype, N = (H / p) * (W / p) in raster order; equals
        conv2d(normalised, weight, bias, stride=p).flatten(2).transpose(1, 2). Differentiable in
        weight, bias and float images.
    """
    _validate(images, weight, bias)
    affine_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale, shift = _affine(images, weight.shape[1], mean, std, affine_dtype)
    if _eager.plain_inference(images, weight, bias, scale, shift):
        return _embed(images, weight, bias, scale, shift)
    return patch_embed_fwd(images, weight, bias, scale, shift)
