"""Launchers of the patch-embedding kernels in csrc/cpu/patch_embed.cpp and csrc/cuda/patch_embed.cu.

The image crosses the boundary as an address plus the element strides of its logical
(b, c, h, w) dims: uint8 (B, H, W, C) and float (B, C, H, W), views included, need no copy.
"""

import torch

from vlmfast.native._common import DTYPE_TAGS, dtype_tag, launch_args, module_for
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record_native
from vlmfast.runtime.layout import channels_first

IMAGE_UINT8_TAG = 3  # csrc/cpu/patch_embed.h: kImageUint8


def _image_args(images: torch.Tensor, patch: int) -> dict:
    """image address, element-type tag, (B, C, H, W, p) and the (b, c, h, w) strides."""
    view = channels_first(images)
    tag = IMAGE_UINT8_TAG if images.dtype == torch.uint8 else DTYPE_TAGS[images.dtype]
    return {
        "image": images.data_ptr(), "image_dtype": tag, "sizes": (*view.shape, patch),
        "image_strides": view.stride(),
    }


def forward(images, weight, bias, scale, shift) -> torch.Tensor:
    """(B, N, D) in weight's dtype: the fused normalise + patchify + GEMM + bias (C++ only)."""
    record_native("patch_embed", weight.device)
    patch, d = weight.shape[-1], weight.shape[0]
    args = _image_args(images, patch)
    batch, _, height, width, _ = args["sizes"]
    n = (height // patch) * (width // patch)
    out = _alloc.empty(batch, n, d, dtype=weight.dtype, device=weight.device)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    scale32, shift32 = scale.float().contiguous(), shift.float().contiguous()
    module_for(weight.device).patch_embed_forward(
        **args, weight=weight.data_ptr(), bias=bias.data_ptr() if bias is not None else 0, D=d,
        weight_dtype=dtype_tag(weight), scale=scale32.data_ptr(), shift=shift32.data_ptr(),
        out=out.data_ptr(), **launch_args(weight.device),
    )
    return out


def gather(images, patch: int, scale, shift, dtype: torch.dtype) -> torch.Tensor:
    """(B * N, C * p * p) normalised patches x * scale[c] + shift[c] in `dtype`."""
    record_native("patch_gather", images.device)
    args = _image_args(images, patch)
    batch, channels, height, width, _ = args["sizes"]
    rows = batch * (height // patch) * (width // patch)
    out = _alloc.empty(rows, channels * patch * patch, dtype=dtype, device=images.device)
    scale32, shift32 = scale.float().contiguous(), shift.float().contiguous()
    module_for(images.device).patch_gather(
        **args, scale=scale32.data_ptr(), shift=shift32.data_ptr(), out=out.data_ptr(),
        out_dtype=DTYPE_TAGS[dtype], **launch_args(images.device),
    )
    return out


def weight_grad(grad_rows, images, patch: int, scale, shift) -> torch.Tensor:
    """(D, C * p * p) in grad_rows' dtype: grad_rows (B * N, D)^T @ normalised patches (C++ only)."""
    record_native("patch_weight_grad", images.device)
    args = _image_args(images, patch)
    d = grad_rows.shape[1]
    padded = -(-d // 32) * 32  # the kernel reads grad rows in 32-column panels
    grad32 = torch.nn.functional.pad(grad_rows.float(), (0, padded - d)).contiguous()
    _, channels, _, _, _ = args["sizes"]
    out = _alloc.empty(d, channels * patch * patch, dtype=torch.float32, device=images.device)
    scale32, shift32 = scale.float().contiguous(), shift.float().contiguous()
    module_for(images.device).patch_embed_weight_grad(
        **args, scale=scale32.data_ptr(), shift=shift32.data_ptr(), grad=grad32.data_ptr(), D=d,
        ldg=padded, grad_weight=out.data_ptr(), **launch_args(images.device),
    )
    return out.to(grad_rows.dtype)
