"""One dense attention forward or backward on the backend the dispatch policy chose.

Shapes (validated by the caller): q (B, H, L, E), k / v (B, Hkv, S, E) with H % Hkv == 0 and a
contiguous head dim, a float32 additive bias expanded to (B, H, L, S) or None, rotary tables
(L, R/2) or None. The forward returns
(out (B, H, L, E), lse float32 (B, H, L)); the backward (dq, dk, dv), dk and dv summed over each
GQA group. Triton and C++ rotate q and k inside the kernel; the reference rotates around it.
"""

import functools

import torch

from vlmfast.ops import _dispatch, reference
from vlmfast.ops.rotary import rotary_fwd

MAX_HEAD_DIM = 256  # the Triton and C++ kernels hold one head-dim row per tile (BLOCK_E <= 256)


@functools.cache
def native():
    """vlmfast/native/attention.py, imported on first use (an import statement per call shows
    in a decode step)."""
    from vlmfast.native import attention as native_attention

    return native_attention


@functools.cache
def triton():
    """kernels/attention.py (importing it imports triton: only when Triton runs)."""
    from vlmfast.kernels import attention as triton_attention

    return triton_attention


def forward(backend: str, q, k, v, bias, scale: float, is_causal: bool, cos, sin):
    if backend == "triton":
        return triton().forward(q, k, v, scale=scale, is_causal=is_causal, bias=bias,
                                rotary=None if cos is None else (cos, sin))
    if backend == "cpp":
        # The C++ kernel rotates q and k as it packs them (float32 tables, no extra pass). The
        # arguments are validated already: the launch without the launcher's own checks.
        return native().launch_forward(q, k, v, bias, scale, is_causal, float32_tables(cos, sin))
    _dispatch.record("attention", "reference")
    if cos is not None:
        q, k = _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)
    return reference.attention_forward(q, k, v, bias, scale, is_causal)


def backward(backend: str, grad, q, k, v, out, lse, bias, scale: float, is_causal: bool, cos, sin):
    if backend == "triton":
        return triton().backward(grad, q, k, v, out, lse, scale=scale, is_causal=is_causal,
                                 bias=bias, rotary=None if cos is None else (cos, sin))
    if backend == "cpp":
        # Rotation inside the kernel; dq, dk come back already through its inverse.
        return native().launch_backward(grad, q, k, v, out, lse, bias, scale, is_causal,
                                        float32_tables(cos, sin))
    _dispatch.record("attention_bwd", "reference")
    if cos is not None:
        q, k = _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)
    dq, dk, dv = reference.attention_backward(grad, q, k, v, out, lse, bias, scale, is_causal)
    if cos is not None:
        # The rotation is orthogonal: the gradient goes back through its transpose.
        dq, dk = _rotate(dq, cos, sin, True), _rotate(dk, cos, sin, True)
    return dq, dk, dv


def _rotate(x, cos, sin, conjugate: bool):
    """x (B, H, L, E) rotated by the tables (the inverse rotation with `conjugate`)."""
    return rotary_fwd(x, cos, sin, False, conjugate, 2)


def float32_tables(cos, sin):
    """The (cos, sin) tables as the C++ kernel reads them (float32), or None."""
    if cos is None:
        return None
    return cos.detach().to(torch.float32), sin.detach().to(torch.float32)
