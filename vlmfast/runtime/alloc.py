"""Output allocation for every launcher.

With VLMFAST_POISON=1 (the test suite sets it) outputs start as NaN instead of uninitialised
memory, so an element a kernel forgets to write fails the comparison instead of passing by luck.
The variable is read once, when vlmfast is imported (an environment read per call was ~1 us of
a ~10 us decode-step attention).
"""

import os

import torch

POISON = os.environ.get("VLMFAST_POISON") == "1"


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    return _poisoned(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous tensor of tensor's shape and device (dtype: tensor's unless given).
    torch.empty_like skips parsing a shape and a device: ~2 us less than torch.empty(shape, ...)
    (a decode step's attention output is ~15 us all told)."""
    return _poisoned(torch.empty_like(tensor, dtype=dtype or tensor.dtype, memory_format=torch.contiguous_format))
