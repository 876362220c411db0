"""Views that let one kernel serve tensors of any rank or memory layout."""

import math

import torch


def rows_view(x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x viewed as (A, L, M, E): A = dims before seq_dim, L = x.shape[seq_dim], M = dims between
    seq_dim and the last, E = the last dim with stride 1. A view when the strides allow it
    (e.g. q sliced out of a fused qkv tensor), a contiguous copy otherwise."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    a = math.prod(x.shape[:seq_dim])
    m = math.prod(x.shape[seq_dim + 1 : -1])
    return x.reshape(a, x.shape[seq_dim], m, x.shape[-1])


def matrix_view(x: torch.Tensor) -> torch.Tensor:
    """x viewed as (rows, last dim) with the last dim's stride 1 and one row stride: a view when
    the strides allow it (e.g. a column slice of a wider buffer), a contiguous copy otherwise."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims that do not flatten into one row stride
        return x.contiguous().view(-1, x.shape[-1])


def channels_first(images: torch.Tensor) -> torch.Tensor:
    """The logical (B, C, H, W) view of uint8 (B, H, W, C) or float (B, C, H, W) images, no copy:
    kernels address the image through this view's strides, whatever the memory layout."""
    return images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images
