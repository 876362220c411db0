"""Helpers shared by the Triton kernels."""

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run kernels without a GPU) truncates
# float32 -> bfloat16 instead of rounding to nearest even as the GPU does. Kernels round by hand
# before the cast when this is set, so interpreted results carry the GPU's rounding error.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _round_to_bfloat16(v):
    # float32 -> the nearest bfloat16 value (ties to even), still held in float32.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dtype_of(v, ptr, ROUND_BF16: tl.constexpr):
    """v (float32) in the element type of `ptr`, rounded to nearest even."""
    if ROUND_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = _round_to_bfloat16(v)
    return v.to(ptr.dtype.element_ty)
