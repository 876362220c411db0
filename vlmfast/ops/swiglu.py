"""SwiGLU's gate: silu(gate) * up from one fused projection's output, the MLP of Llama-style
decoders (SmolVLM2's, LLaVA's, Qwen2-VL's).

    hidden = swiglu(gate_up)     # (..., 2 I) = [gate | up] -> (..., I)

The eager composite F.silu(gate) * up keeps silu(gate) for the backward beside the two halves,
and its backward runs four elementwise ops and a concatenation of the halves' gradients. Here the
forward is one pass that keeps nothing but gate_up, and the backward one pass that recomputes
silu and writes both halves of the gradient in place, in the dtype rounding of the composite.

Layers: public function (validates) -> custom ops `vlmfast::swiglu_fwd` / `vlmfast::swiglu_bwd`
(fake impls + autograd) -> backend: Triton (kernels/swiglu.py) on CUDA, C++ (csrc/cpu/swiglu.cpp)
on the CPU, the reference composite (ops/reference.py) for anything else (float64).
"""

import torch

from vlmfast.ops import _checks, _dispatch, _eager, reference


@torch.library.custom_op("vlmfast::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., I)."""
    return _gate(gate_up)


def _gate(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu_fwd's body (also run directly by plain inference calls, ops/_eager.py)."""
    launchers = _launchers(gate_up)
    if launchers is not None:
        return launchers.forward(gate_up)
    _dispatch.record("swiglu", "reference")
    return reference.swiglu(gate_up).contiguous()


def _launchers(gate_up: torch.Tensor):
    """The launcher module of the kernel that runs this call (kernels/swiglu.py for Triton,
    native/swiglu.py for C++: the same forward / backward), or None for the reference path."""
    backend = _dispatch.select("swiglu", gate_up.device, gate_up.dtype)
    if not gate_up.numel():
        return None
    if backend == "triton":
        from vlmfast.kernels import swiglu as triton_swiglu

        return triton_swiglu
    if backend == "cpp":
        from vlmfast.native import swiglu as native_swiglu

        return native_swiglu
    return None


@swiglu_fwd.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("vlmfast::swiglu_bwd", mutates_args=())
def swiglu_bwd(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of gate_up, (..., 2 I)."""
    launchers = _launchers(gate_up)
    if launchers is not None:
        return launchers.backward(grad, gate_up)
    _dispatch.record("swiglu_bwd", "reference")
    return reference.swiglu_backward(grad, gate_up).contiguous()


@swiglu_bwd.register_fake
def _(grad, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (gate_up,) = inputs
    ctx.save_for_backward(gate_up)


def _backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return swiglu_bwd(grad, gate_up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate and up the two halves of gate_up's last dim.

    Arguments:
        gate_up: (..., 2 I), the gate projection in [..., :I] and the up projection in
            [..., I:] (one Linear of 2 I outputs); float32, float16, bfloat16 (float64 runs the
            reference).
    Returns:
        (..., I) in gate_up's dtype: F.silu(gate) * up, rounded where that composite rounds.
        Differentiable; the backward keeps only gate_up.
    """
    _checks.floating("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: expected (..., 2 I), an even last dim, got {_checks.shape_of(gate_up)}")
    if _eager.plain_inference(gate_up):
        return _gate(gate_up)
    return swiglu_fwd(gate_up)
