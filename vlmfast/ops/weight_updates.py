"""Weights whose optimizer step can be taken inside an op's backward, slice by slice.

An optimizer that updates each parameter during the backward (vlmfast.train.AdamWInBackward)
still needs a parameter's whole gradient at once, and for a language-model head that is a
(V, D) tensor: 113 MiB for SmolVLM2-256M's in float32, the largest single allocation of a
fine-tuning step. An elementwise optimizer does not need it whole, though: each row of the
weight can be updated from its own rows of the gradient. An op that makes the gradient in row
slices (ops.linear_cross_entropy with weight_used_once=True) asks this registry whether the
weight's optimizer takes slices, and if so hands each slice over as it is made and frees it.

    handle = register(weight, begin)   # begin(weight) -> update(rows: slice, grad) or None
    update = begin_update(weight)      # None: no optimizer here, or it wants the whole gradient
    handle.remove()

begin() is called once per backward: it returns the function that applies one slice (its
AdamW step counter advanced once for the whole weight), or None when it cannot take slices this
time (on its first step, before its state exists, for instance); the op then returns the whole
gradient the usual way.
"""

from collections.abc import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

SliceUpdate = Callable[[slice, torch.Tensor], None]

# float32 bytes of one slice's weight gradient (rows, D), and of the (N, rows) logits the loss
# makes for it: small against the whole (V, D) gradient, large enough for GEMMs to run at speed
SLICE_BYTES = 8 * 2**20

_begins = WeakTensorKeyDictionary()


class _Handle:
    def __init__(self, weight: torch.Tensor):
        self._weight = weight

    def remove(self) -> None:
        _begins.pop(self._weight, None)


def register(weight: torch.Tensor, begin: Callable[[torch.Tensor], SliceUpdate | None]) -> _Handle:
    """Registers `begin` for `weight` (one per weight: a later registration replaces it)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a tensor, got {type(weight).__name__}")
    _begins[weight] = begin
    return _Handle(weight)


def registered(weight: torch.Tensor) -> bool:
    return weight in _begins


def sliced(weight: torch.Tensor, weight_used_once: bool) -> bool:
    """Whether an op should take its slice-handing backward for `weight` in this call: the
    caller promised the op is the weight's only use, a gradient for it will be made (eager,
    not compiling) and an optimizer is registered for it."""
    return (weight_used_once and weight.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and registered(weight))


def slice_rows(rows_per_column: int, columns: int, total: int) -> int:
    """Rows per slice: about SLICE_BYTES of float32 (rows, columns) gradient and of
    (rows_per_column, rows) companion (a loss's logits; 0 for none), a multiple of 64 in
    [64, total]."""
    rows = SLICE_BYTES // (4 * max(rows_per_column, columns, 1)) // 64 * 64
    return min(total, max(64, rows))


def begin_update(weight: torch.Tensor) -> SliceUpdate | None:
    begin = _begins.get(weight)
    return begin(weight) if begin is not None else None
