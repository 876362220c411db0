// Fused linear + cross-entropy (the language-model head's loss) on the CPU: entry point bound in
// csrc/bindings.cpp.
//
// hidden (N, D) rows `hidden_stride` elements apart, weight (V, D) rows `weight_stride` apart (the
// feature dim contiguous in both), both of one dtype; bias (V,) float32 or null; labels (N,) int64.
// logits_iv = hidden_i . weight_v (+ bias_v), computed in float32 tiles and never stored whole.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

struct LinearCrossEntropyShape {
  int64_t N, D, V;
  int64_t hidden_stride, weight_stride;  // row strides in elements
};

struct LinearCrossEntropyOptions {
  int64_t ignore_index;   // rows with this label (or any label outside [0, V)) have no loss
  float label_smoothing;  // eps: the target is (1 - eps) onehot + eps / V
  int64_t block_rows;     // rows per logit block, rounded up to 96; 0: chosen from V (tests
                          // set it small to cover several blocks)
};

// Writes per row the log-sum-exp `lse` (N,) and the loss `loss_rows` (N,) (0 for ignored rows):
//   loss_i = lse_i - (1 - eps) logit_{i, y_i} - eps / V sum_v logit_iv.
// With row_scale (N,) float32 given, also writes the gradients of sum_i row_scale_i * loss_i:
//   G_iv = row_scale_i (softmax_iv - (1 - eps) [v == y_i] - eps / V)  (0 on ignored rows),
//   grad_hidden = G weight (N, D contiguous, the inputs' dtype), grad_weight = G^T hidden (V, D
//   contiguous, the inputs' dtype), grad_bias = sum_i G_i (float32 (V,), when not null).
// Memory: copies of hidden and weight (float32, or bf16 in dot-product layouts for bfloat16 input
// on CPUs with AVX512-BF16), a float32 (V, D) gradient accumulator and one float32 (V, R) block
// of logits for R rows at a time (R chosen to keep it near 64 MiB).
void linear_cross_entropy(const LinearCrossEntropyShape& shape, const void* hidden,
                          const void* weight, const float* bias, const int64_t* labels,
                          const LinearCrossEntropyOptions& options, float* lse, float* loss_rows,
                          const float* row_scale, void* grad_hidden, void* grad_weight,
                          float* grad_bias, int dtype, int threads);

}  // namespace vlmfast::cpu
