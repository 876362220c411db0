"""The checks every vision-language model makes on a call's token ids and attention mask (before
its family's image checks) and on a loss's labels: ValueError / TypeError naming the argument."""

from __future__ import annotations

import torch

from vlmfast.ops import _checks


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, int]:
    """(B, L) of input_ids, integer (B, L) token ids with L >= 1; attention_mask: None or a
    tensor of that shape."""
    _checks.integer("input_ids", input_ids)
    _checks.rank("input_ids", input_ids, 2, "(B, L) token ids")
    B, L = input_ids.shape
    if L == 0:
        raise ValueError("input_ids: expected (B, L) with L >= 1, got an empty sequence")
    if attention_mask is not None:
        _checks.tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask: expected (B, L) = ({B}, {L}), got {_checks.shape_of(attention_mask)}")
    return B, L


def check_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """labels of a loss: integer token ids shaped like input_ids."""
    _checks.integer("labels", labels)
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {_checks.shape_of(labels)}")
