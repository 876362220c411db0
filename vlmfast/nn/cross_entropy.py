"""The language-model head's loss as a module, on vlmfast.ops.linear_cross_entropy.

    loss_fn = LinearCrossEntropy(ignore_index=-100)
    loss = loss_fn(hidden, model.lm_head.weight, labels)   # (B, L, D), (V, D), (B, L) -> ()

It holds no parameters, only options: the head's weight (tied to the input embedding or not)
stays with the model and is passed in, so the (B, L, V) logits never exist during training.
"""

import torch
from torch import nn

from vlmfast import ops
from vlmfast.ops.cross_entropy import REDUCTIONS


class LinearCrossEntropy(nn.Module):
    """cross_entropy(hidden @ weight.T + bias, labels), fused; see ops.linear_cross_entropy."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 softcap: float | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.softcap = label_smoothing, softcap

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, D) or (B, L, D), weight (V, D), labels (N,) or (B, L) int64, bias (V,) or None
        -> float32 loss: () for "mean" / "sum", labels' shape for "none"."""
        return ops.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}")
