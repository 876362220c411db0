// Patch embedding on the CPU (normalise + patchify + GEMM + bias in one pass): entry points bound
// in csrc/bindings.cpp.
//
// The image is addressed through the strides of its logical (b, c, h, w) dims, so one kernel
// reads uint8 (B, H, W, C) as decoded and float (B, C, H, W) alike, views included. A patch row
// has K = C * p * p values ordered (c, i, j), like a flattened Conv2d weight (D, C, p, p).
// Normalisation is per channel: x_n = x * scale[c] + shift[c] (scale = 1 / (255 std) for uint8,
// shift = -mean / std; float32 (C,) each).
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

// Element type tags of the image: the DType tags of common/dtype.h plus uint8.
constexpr int kImageUint8 = 3;

struct PatchImage {
  const void* data;
  int dtype;                 // 0 float32, 1 float16, 2 bfloat16, 3 uint8
  int64_t B, C, H, W, patch;
  int64_t strides[4];        // element strides of b, c, h, w
};

// out (B * N, D) row-major in `weight_dtype` = normalised patches (B * N, K) @ weight(D, K)^T + bias.
// weight: contiguous (D, K) in weight_dtype; bias: (D,) in weight_dtype or null.
void patch_embed_forward(const PatchImage& image, const void* weight, const void* bias, int64_t D,
                         int weight_dtype, const float* scale, const float* shift, void* out,
                         int threads);

// out (B * N, K) row-major in out_dtype: the normalised patches themselves (for the backward's
// GEMMs, and for hand-off to an external GEMM).
void patch_gather(const PatchImage& image, const float* scale, const float* shift, void* out,
                  int out_dtype, int threads);

// grad_weight (D, K) float32 = grad^T @ normalised patches: the weight gradient of the conv.
// grad: (B * N, ldg) float32 row-major, ldg >= D rounded up to a multiple of 32 (the columns
// from D on are read but do not matter).
void patch_embed_weight_grad(const PatchImage& image, const float* scale, const float* shift,
                             const float* grad, int64_t D, int64_t ldg, float* grad_weight,
                             int threads);

}  // namespace vlmfast::cpu
