"""Running a decoder's last layer on the rows that are read, not on all of them.

A causal decoder's last layer feeds nothing but the head: below it, every row's keys and values
are needed (later rows attend to them), but only the rows whose outputs are read need its
attention output, its MLP and the final norm. A training batch reads the rows that predict a
label (a chat answer, a caption: the last few dozen of hundreds of image and prompt tokens), a
prefill reads its last row. The queries of those rows attend to every key as they would in the
full layer, so the outputs are the same rows of the same computation.
"""

from __future__ import annotations

import torch


def first_predicting_row(labels: torch.Tensor) -> int:
    """The first position i, over the batch, whose logits predict a label (labels[:, i + 1] is
    not -100): the rows before it take no part in the loss. 0 when nothing is labelled or while
    compiling (a data-dependent length)."""
    if torch.compiler.is_compiling() or labels.shape[1] < 2:
        return 0
    predicting = (labels[:, 1:] != -100).any(dim=0)
    found = predicting.nonzero()
    return int(found[0, 0]) if found.numel() else 0


def rows_mask(attn_mask: torch.Tensor | None, is_causal: bool, first: int, length: int, keys: int,
              device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for the queries of rows [first, length) of a layer whose full call
    took (attn_mask, is_causal) over `length` queries and `keys` keys: the mask's rows sliced, and
    the causal rule written out as a bool (length - first, keys) mask (query row i reads keys
    j <= i, the attention op's top-left rule), since the op's own is_causal would align the
    remaining queries with the first keys."""
    if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == length:
        attn_mask = attn_mask[..., first:, :]
    if is_causal:
        rows = torch.arange(first, length, device=device)[:, None]
        causal = torch.arange(keys, device=device)[None, :] <= rows
        attn_mask = causal if attn_mask is None else attn_mask & causal
    return attn_mask, False
