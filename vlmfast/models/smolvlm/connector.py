"""Pixel shuffle + modality projection: a tile's (side x side) vision features become
(side / s)^2 text-width tokens, each s x s neighbourhood concatenated, then one Linear."""

import torch
from torch import nn

from vlmfast.models import _ops as _shared_ops


def pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """x: (N, S, D) over a square side x side grid -> (N, S / s^2, D * s^2).

    Output token (I, J) (I, J < side / s) concatenates, in this order, the features at rows
    I*s + a, columns J*s + b for a, b < s, row a major (transformers' channel order).
    """
    n, seq, dim = x.shape
    side = int(round(seq**0.5))
    s = scale_factor
    if side * side != seq or side % s:
        raise ValueError(
            f"image_hidden_states: expected (N, side^2, D) with side a multiple of scale_factor={s}, "
            f"got {tuple(x.shape)}"
        )
    # (N, I, a, J, b, D) -> (N, I, J, a, b, D): one reshape and one permute, same order as transformers'
    x = x.reshape(n, side // s, s, side // s, s, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, seq // (s * s), dim * s * s)


class ModalityProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return _shared_ops.linear(x, self.proj)  # vlmfast's GEMM on the CPU (bf16 too); LoRA-aware


class Connector(nn.Module):
    """(N, side^2, Dv) -> (N, (side / s)^2, Dt)."""

    def __init__(self, vision_width: int, text_width: int, scale_factor: int, *, device=None, dtype=None):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = ModalityProjection(
            vision_width * scale_factor**2, text_width, device=device, dtype=dtype
        )

    def forward(self, image_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(image_hidden_states, self.scale_factor))
