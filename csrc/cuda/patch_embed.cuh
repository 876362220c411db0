// Patch gather on the GPU: entry point bound in csrc/cuda/module.cpp.
// Same image description as csrc/cpu/patch_embed.h: the strides of the logical (b, c, h, w) dims,
// so uint8 (B, H, W, C) as decoded and float (B, C, H, W) share one kernel.
#pragma once

#include <cstdint>

namespace vlmfast::cuda {

constexpr int kImageUint8 = 3;  // image tag beside the DType tags 0 float32, 1 float16, 2 bfloat16

struct PatchImage {
  const void* data;
  int dtype;
  int64_t B, C, H, W, patch;
  int64_t strides[4];  // element strides of b, c, h, w
};

// out (B * N, C * p * p) row-major in out_dtype: x * scale[c] + shift[c] per patch row (raster
// order), columns (c, i, j) like a flattened Conv2d weight; the GEMM runs on it afterwards.
void patch_gather(const PatchImage& image, const float* scale, const float* shift, void* out,
                  int out_dtype, uintptr_t stream);

}  // namespace vlmfast::cuda
