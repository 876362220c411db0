"""Input validation shared by the public ops (and the native launchers that check their own
arguments, e.g. native/decode.py).

Every message names the argument and what was expected, e.g.
`query: expected (B, H, L, E), got (2, 197, 64)`, and is raised before any kernel runs.
"""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def shape_of(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in tensor.shape) + ")"


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {value.dtype}"
        )
    return value


def integer(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
    return value


def rank(name: str, value: torch.Tensor, ranks: int | Sequence[int], layout: str) -> torch.Tensor:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if value.dim() not in allowed:
        raise ValueError(f"{name}: expected {layout}, got {shape_of(value)}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} like {first_name}, got {value.device}"
            )


def bias(value: torch.Tensor, size: int, dim: str, weight: torch.Tensor) -> torch.Tensor:
    """A floating (size,) bias of weight's dtype; dim names the size in the message ("N", "D")."""
    floating("bias", value)
    if value.shape != (size,):
        raise ValueError(f"bias: expected ({dim},) = ({size},), got {shape_of(value)}")
    if value.dtype != weight.dtype:
        raise TypeError(f"bias: expected weight's dtype {weight.dtype}, got {value.dtype}")
    return value
