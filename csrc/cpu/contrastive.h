// Contrastive losses (CLIP's InfoNCE, SigLIP's sigmoid loss) on the CPU: entry points bound in
// csrc/bindings.cpp.
//
// a (image) and b (text) are (B, D) feature matrices, already L2-normalised when the caller wants
// that, rows `a_stride` / `b_stride` elements apart, the feature dim contiguous. `scale` is the
// logit multiplier (already exp'd), `bias` SigLIP's logit bias. logits_ij = scale * a_i . b_j (+ bias).
// The B x B logits are never stored: they are recomputed in cache-sized tiles, so the memory used
// is O(B * D) (fp32 copies of the features, packed panels, per-thread gradient partials).
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

struct PairShape {
  int64_t B, D;
  int64_t a_stride, b_stride;  // row strides in elements (the feature dim has stride 1)
};

// loss = (sum_i (row_lse_i - l_ii) + sum_j (col_lse_j - l_jj)) / (2B). Writes the float32 (B,)
// log-sum-exps of the rows and columns of the logits (the backward needs them) and returns the loss.
double infonce_forward(const PairShape& shape, const void* a, const void* b, float scale,
                       float* row_lse, float* col_lse, int dtype, int threads);

// Gradients of grad * loss: grad_a, grad_b contiguous (B, D) in the features' dtype; returns the
// gradient with respect to scale.
double infonce_backward(const PairShape& shape, const void* a, const void* b, float scale,
                        const float* row_lse, const float* col_lse, float grad, void* grad_a,
                        void* grad_b, int dtype, int threads);

// loss = -sum_ij logsigmoid(y_ij * l_ij) / B with y = 2I - 1.
double siglip_forward(const PairShape& shape, const void* a, const void* b, float scale, float bias,
                      int dtype, int threads);

// Gradients of grad * loss: grad_a, grad_b as above; the scale and bias gradients are written to
// grad_scale_bias[0] and [1]. With loss non-null the loss itself is written there too, from the
// same pass over the logits (the forward and backward of training in one sweep, 3/4 of the work).
void siglip_backward(const PairShape& shape, const void* a, const void* b, float scale, float bias,
                     float grad, void* grad_a, void* grad_b, double* grad_scale_bias, int dtype,
                     int threads, double* loss = nullptr);

}  // namespace vlmfast::cpu
