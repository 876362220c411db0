"""Output allocation for every launcher.

With VLMFAST_POISON=1 (the test suite sets it) outputs start as NaN instead of uninitialised
memory, so an element a kernel forgets to write fails the comparison instead of passing by luck.
The variable is read once, when vlmfast is imported (an environment read per call was ~1 us of
a ~10 us decode-step attention).
"""

import os

import torch

POISON = os.environ.get("VLMFAST_POISON") == "1"


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device)
