#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/common.cuh"
#include "cuda/rotary.cuh"

namespace vlmfast::cuda {
namespace {

__device__ __forceinline__ void pair_index(int64_t i, int64_t half, bool interleaved, int64_t& a,
                                           int64_t& b) {
  a = interleaved ? 2 * i : i;
  b = interleaved ? 2 * i + 1 : i + half;
}

// One block per group of rows; threads stride over the pairs (and the untouched tail) of a row,
// so consecutive threads read consecutive elements of each half.
template <typename T>
__global__ void rotary_kernel(RotaryShape s, const T* __restrict__ x, const float* __restrict__ cos,
                              const float* __restrict__ sin, T* __restrict__ out, bool interleaved,
                              float sin_sign, int64_t rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t m = r % s.M, l = (r / s.M) % s.L, a = r / (s.M * s.L);
    const T* x_row = x + a * s.x_strides[0] + l * s.x_strides[1] + m * s.x_strides[2];
    T* out_row = out + a * s.out_strides[0] + l * s.out_strides[1] + m * s.out_strides[2];
    const float* c_row = cos + l * s.half_rotary;
    const float* s_row = sin + l * s.half_rotary;
    for (int64_t i = threadIdx.x; i < s.half_rotary; i += blockDim.x) {
      int64_t ia, ib;
      pair_index(i, s.half_rotary, interleaved, ia, ib);
      const float xa = load_float(x_row + ia), xb = load_float(x_row + ib);
      const float c = c_row[i], sn = sin_sign * s_row[i];
      out_row[ia] = store_cast<T>(xa * c - xb * sn);
      out_row[ib] = store_cast<T>(xb * c + xa * sn);
    }
    for (int64_t e = 2 * s.half_rotary + threadIdx.x; e < s.E; e += blockDim.x) out_row[e] = x_row[e];
  }
}

// One block per sequence position l; each thread owns pairs i and sums over the A * M rows.
template <typename T>
__global__ void table_backward_kernel(RotaryShape s, const T* __restrict__ grad,
                                      const T* __restrict__ x, float* __restrict__ grad_cos,
                                      float* __restrict__ grad_sin, bool interleaved) {
  const int64_t l = blockIdx.x;
  for (int64_t i = threadIdx.x; i < s.half_rotary; i += blockDim.x) {
    int64_t ia, ib;
    pair_index(i, s.half_rotary, interleaved, ia, ib);
    float dc = 0.f, ds = 0.f;
    for (int64_t a = 0; a < s.A; ++a) {
      for (int64_t m = 0; m < s.M; ++m) {
        const T* x_row = x + a * s.x_strides[0] + l * s.x_strides[1] + m * s.x_strides[2];
        const T* g_row = grad + a * s.out_strides[0] + l * s.out_strides[1] + m * s.out_strides[2];
        const float xa = load_float(x_row + ia), xb = load_float(x_row + ib);
        const float ga = load_float(g_row + ia), gb = load_float(g_row + ib);
        dc += ga * xa + gb * xb;
        ds += gb * xa - ga * xb;
      }
    }
    grad_cos[l * s.half_rotary + i] = dc;
    grad_sin[l * s.half_rotary + i] = ds;
  }
}

__global__ void rope_2d_kernel(const int64_t* __restrict__ positions, int64_t n,
                               const float* __restrict__ inv_freq, int64_t quarter,
                               float* __restrict__ cos, float* __restrict__ sin) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= n * quarter) return;
  const int64_t t = idx / quarter, j = idx % quarter;
  const float row_angle = static_cast<float>(positions[2 * t]) * inv_freq[j];
  const float col_angle = static_cast<float>(positions[2 * t + 1]) * inv_freq[j];
  float* c = cos + t * 2 * quarter;
  float* s = sin + t * 2 * quarter;
  // Precise sincosf (not the fast-math intrinsic): the tables must match the CPU reference.
  sincosf(row_angle, s + j, c + j);
  sincosf(col_angle, s + quarter + j, c + quarter + j);
}

}  // namespace

void rotary_forward(const RotaryShape& shape, const void* x, const float* cos, const float* sin,
                    void* out, int dtype, bool interleaved, bool conjugate, uintptr_t stream) {
  const int64_t rows = shape.A * shape.L * shape.M;
  // 32 threads across a row's pairs, 8 rows per block; enough blocks to fill the GPU.
  const dim3 block(32, 8);
  const int64_t blocks = std::min<int64_t>((rows + block.y - 1) / block.y, 65535 * 8);
  with_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rotary_kernel<T><<<blocks, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        shape, static_cast<const T*>(x), cos, sin, static_cast<T*>(out), interleaved,
        conjugate ? -1.f : 1.f, rows);
  });
  check_launch("rotary_forward");
}

void rotary_table_backward(const RotaryShape& shape, const void* grad, const void* x,
                           float* grad_cos, float* grad_sin, int dtype, bool interleaved,
                           uintptr_t stream) {
  with_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    table_backward_kernel<T><<<shape.L, 128, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        shape, static_cast<const T*>(grad), static_cast<const T*>(x), grad_cos, grad_sin,
        interleaved);
  });
  check_launch("rotary_table_backward");
}

void rope_2d_forward(const int64_t* positions, int64_t n, const float* inv_freq, int64_t quarter,
                     float* cos, float* sin, uintptr_t stream) {
  const int64_t total = n * quarter;
  const int threads = 256;
  rope_2d_kernel<<<(total + threads - 1) / threads, threads, 0,
                   reinterpret_cast<cudaStream_t>(stream)>>>(positions, n, inv_freq, quarter, cos, sin);
  check_launch("rope_2d_forward");
}

}  // namespace vlmfast::cuda
