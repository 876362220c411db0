"""CPU weight packing for inference: oneDNN's blocked layout of a Linear's weight.

torch's plain bf16 / fp32 GEMV at one row (a decode step) reads weights at about half the speed
of oneDNN's packed path, which transformers does not use eagerly (inductor does, with freezing).
pack(layer) stores a packed copy beside the weight (not a parameter, not in the state dict);
linear() uses it for calls of fewer than ops.linear's SMALL_M rows (decode steps) while gradients
are off and the weight is the one that was packed (same storage, same version counter, pointer
and dtype: an in-place update or a .to() makes it stale and the plain GEMM runs). Calls of more
rows (a prefill) and training go to vlmfast.ops.linear.
bf16 results are those of F.linear (same oneDNN kernels); fp32 ones differ by rounding only.
"""

import torch
from torch import nn

from vlmfast import ops
from vlmfast.ops.linear import SMALL_M

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
    """F.linear(x, weight, bias), through layer's packed copy of weight when it is current and
    the call has few rows (a decode step); else vlmfast.ops.linear (its float32 / bf16 GEMM on the
    CPU, under autocast too; torch's elsewhere). x (..., K), weight (N, K) -> (..., N)."""
    add_adapters = getattr(layer, "add_adapters", None)
    if add_adapters is not None:  # a LoRA layer (vlmfast.train.lora): its low-rank term joins every call
        return add_adapters(x, ops.linear(x, weight, bias))
    entry = layer.__dict__.get(_ATTR)
    if (entry is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.numel() < SMALL_M * x.shape[-1]):
        packed, packed_from, version, pointer, dtype = entry
        # module.to() swaps .data without a version bump: the pointer and dtype catch it
        if (packed_from is weight and weight._version == version and weight.data_ptr() == pointer
                and weight.dtype == dtype == x.dtype):
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    # a prefill, training (forward and backward), bf16 autocast: vlmfast's GEMM where it runs
    # (ops.linear hands the rest, and any shape class where torch measured faster, to torch)
    return ops.linear(x, weight, bias)
