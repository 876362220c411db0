// SwiGLU's gate on the CPU, silu(gate) * up, forward and backward in one pass each: entry points
// bound in csrc/bindings.cpp.
//
// gate_up is (rows, 2 I) with row stride `stride` (elements, last dim contiguous): the gate in
// columns [0, I), the up projection in [I, 2 I), as one fused Linear writes them. out and grad are
// (rows, I) contiguous, grad_gate_up (rows, 2 I) contiguous. Values are computed in float32 and
// rounded to the dtype where the eager composite F.silu(gate) * up rounds: after silu, after the
// product; in the backward after grad * up and on each output.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

struct SwigluShape {
  int64_t rows, I, stride;  // stride: elements between rows of gate_up (>= 2 I)
};

// out = silu(gate) * up.
void swiglu_forward(const SwigluShape& shape, const void* gate_up, void* out, int dtype, int threads);

// grad_gate_up = [grad * up * silu'(gate), grad * silu(gate)]: both halves of the gradient written
// side by side, as the fused Linear's backward reads them (no concatenation).
void swiglu_backward(const SwigluShape& shape, const void* grad, const void* gate_up, void* grad_gate_up,
                     int dtype, int threads);

}  // namespace vlmfast::cpu
