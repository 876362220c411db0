#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/patch_embed.cuh"

namespace vlmfast::cuda {
namespace {

// One thread per output element, consecutive threads along a patch row's K = C * p * p columns
// (coalesced stores; the loads of one (c, i) image row are contiguous runs of p pixels).
template <typename T, typename O>
__global__ void patch_gather_kernel(PatchImage im, const float* __restrict__ scale,
                                    const float* __restrict__ shift, O* __restrict__ out,
                                    int64_t rows, int64_t K) {
  const int64_t p = im.patch, pp = p * p;
  const int64_t grid_w = im.W / p, n_per_image = (im.H / p) * grid_w;
  const T* image = static_cast<const T*>(im.data);
  const int64_t total = rows * K;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / K, k = idx - r * K;
    // row r = patch (b, py, px) in raster order; column k = (c, i, j)
    const int64_t b = r / n_per_image, n = r - b * n_per_image;
    const int64_t py = n / grid_w, px = n - py * grid_w;
    const int64_t c = k / pp, within = k - c * pp;
    const int64_t i = within / p, j = within - i * p;
    const T* src = image + b * im.strides[0] + c * im.strides[1] + (py * p + i) * im.strides[2] +
                   (px * p + j) * im.strides[3];
    out[idx] = store_cast<O>(load_float(src) * scale[c] + shift[c]);
  }
}

}  // namespace

void patch_gather(const PatchImage& image, const float* scale, const float* shift, void* out,
                  int out_dtype, uintptr_t stream) {
  if (image.patch <= 0 || image.H % image.patch || image.W % image.patch)
    throw std::invalid_argument("vlmfast: image H and W must be multiples of the patch size");
  if (image.dtype != kImageUint8 && image.dtype != out_dtype)
    throw std::invalid_argument("vlmfast: patch_gather takes uint8 images or images of the output dtype");
  const int64_t rows = image.B * (image.H / image.patch) * (image.W / image.patch);
  const int64_t K = image.C * image.patch * image.patch;
  if (rows * K == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows * K + threads - 1) / threads, 65535LL * 32);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  with_float_type(out_dtype, [&](auto* out_tag) {
    using O = std::remove_pointer_t<decltype(out_tag)>;
    auto launch = [&](auto* image_tag) {
      using T = std::remove_pointer_t<decltype(image_tag)>;
      patch_gather_kernel<T, O><<<blocks, threads, 0, cuda_stream>>>(
          image, scale, shift, static_cast<O*>(out), rows, K);
    };
    if (image.dtype == kImageUint8) launch(static_cast<uint8_t*>(nullptr));
    else launch(static_cast<O*>(nullptr));
  });
  check_launch("patch_gather");
}

}  // namespace vlmfast::cuda
