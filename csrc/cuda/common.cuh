// Helpers shared by the CUDA kernels: element loads and stores through float, the dtype tag
// dispatch, and launch error checks. Tags match csrc/common/dtype.h (0 float32, 1 float16,
// 2 bfloat16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vlmfast::cuda {

__device__ __forceinline__ float load_float(const uint8_t* p) { return static_cast<float>(*p); }
__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// float -> the element type, rounded to nearest even.
template <typename T> __device__ __forceinline__ T store_cast(float v);
template <> __device__ __forceinline__ float store_cast<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_cast<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn with a null pointer of the element type of the runtime tag (for template deduction).
template <typename Fn> void with_float_type(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0: fn(static_cast<float*>(nullptr)); break;
    case 1: fn(static_cast<__half*>(nullptr)); break;
    case 2: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw std::invalid_argument("vlmfast: unknown dtype tag " + std::to_string(dtype));
  }
}

// Raises the last launch error, naming the entry point.
inline void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("vlmfast CUDA ") + what + ": " + cudaGetErrorString(status));
}

}  // namespace vlmfast::cuda
