"""attn_mask -> what the kernels read: one additive bias (bool: True takes part, so False is
-inf; float: added), converted at the mask's own size and expanded with stride 0 where it
broadcasts, so a key-padding mask (B, 1, 1, S) is never (B, H, L, S) in memory."""

import torch

from vlmfast.ops import _checks


def to_bias(attn_mask, target: tuple, device, dtype: torch.dtype) -> torch.Tensor:
    """attn_mask broadcastable to target = (..., L, S) as a `dtype` additive bias expanded to
    target (float32 for the kernels; float64 for float64 queries, which run the reference)."""
    _checks.tensor("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask: expected a bool or floating tensor, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask: expected a tensor on {device} like query, got {attn_mask.device}")
    if not broadcasts_to(attn_mask.shape, target):
        raise ValueError(
            f"attn_mask: expected a shape broadcastable to (..., L, S) = {tuple(target)}, got "
            f"{_checks.shape_of(attn_mask)}"
        )
    if attn_mask.dtype == torch.bool:
        # One where() instead of zeros + masked_fill (a decode step feels each op).
        bias = torch.where(attn_mask, 0.0, float("-inf")).to(dtype)
    else:
        bias = attn_mask.to(dtype)
    return bias.expand(target)


def broadcasts_to(shape, target: tuple) -> bool:
    """Whether `shape` broadcasts to exactly `target` (torch.broadcast_shapes costs ~50 us)."""
    if len(shape) > len(target):
        return False
    return all(size == 1 or size == want for size, want in zip(reversed(shape), reversed(target)))


def broadcast_strides(shape, strides, batch: int, heads: int, length: int, keys: int):
    """The element strides over (B, H, L, S) of a mask of `shape` broadcast to it (0 where it
    broadcasts), or None when it does not broadcast. Unrolled for the usual 4-D mask."""
    if len(shape) == 4:
        mb, mh, ml, ms = shape
        if not ((mb == 1 or mb == batch) and (mh == 1 or mh == heads) and (ml == 1 or ml == length)
                and (ms == 1 or ms == keys)):
            return None
        sb, sh, sl, ss = strides
        return (0 if mb == 1 else sb, 0 if mh == 1 else sh, 0 if ml == 1 else sl, 0 if ms == 1 else ss)
    if not broadcasts_to(shape, (batch, heads, length, keys)):
        return None
    return (0,) * (4 - len(shape)) + tuple(0 if size == 1 else stride for size, stride in zip(shape, strides))


def as_4d(bias: torch.Tensor, batch_heads) -> torch.Tensor:
    """The (..., L, S) expanded bias as (B, H, L, S), matching the 4-D view of the query."""
    if bias.dim() == 3:
        return bias.unsqueeze(0)
    if bias.dim() == 4:
        return bias
    return bias.reshape(*batch_heads, *bias.shape[-2:])
