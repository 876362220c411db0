"""CPU weight packing for inference: oneDNN's blocked layout of a Linear's weight.

torch's plain bf16 / fp32 GEMV at one row (a decode step) reads weights at about half the speed
of oneDNN's packed path, which transformers does not use eagerly (inductor does, with freezing).
pack(layer) stores a packed copy beside the weight (not a parameter, not in the state dict);
linear() uses it while gradients are off and the weight is the one that was packed (same storage,
same version counter, pointer and dtype: an in-place update or a .to() makes it stale and the
plain GEMM runs).
bf16 results are those of F.linear (same oneDNN kernels); fp32 ones differ by rounding only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vlmfast import ops

_ATTR = "_vlmfast_packed"


def available(dtype: torch.dtype) -> bool:
    """Whether oneDNN packing runs here for weights of this dtype."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack(layer: nn.Linear, weight: torch.Tensor | None = None) -> bool:
    """Packs `weight` (default: layer.weight), a CPU (N, K) tensor, for layer. Returns whether it did."""
    weight = layer.weight if weight is None else weight
    if weight.device.type != "cpu" or not available(weight.dtype):
        return False
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    layer.__dict__[_ATTR] = (packed, weight, weight._version, weight.data_ptr(), weight.dtype)
    return True


def unpack(layer: nn.Module) -> None:
    layer.__dict__.pop(_ATTR, None)


def linear(x: torch.Tensor, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through layer's packed copy of weight when it is current.
    x (..., K), weight (N, K) -> (..., N)."""
    add_adapters = getattr(layer, "add_adapters", None)
    if add_adapters is not None:  # a LoRA layer (vlmfast.train.lora): its low-rank term joins every call
        return add_adapters(x, F.linear(x, weight, bias))
    entry = layer.__dict__.get(_ATTR)
    if entry is not None and not torch.is_grad_enabled() and x.device.type == "cpu":
        packed, packed_from, version, pointer, dtype = entry
        # module.to() swaps .data without a version bump: the pointer and dtype catch it
        if (packed_from is weight and weight._version == version and weight.data_ptr() == pointer
                and weight.dtype == dtype == x.dtype):
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if torch.is_grad_enabled() and weight.requires_grad:
        # training a weight: vlmfast's GEMM (float32 on the CPU, ~2x torch's; torch's GEMM for the
        # rest), forward and backward; its packed copy is made per call, none is kept
        return ops.linear(x, weight, bias)
    return F.linear(x, weight, bias)
