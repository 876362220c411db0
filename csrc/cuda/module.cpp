// The Python module of the CUDA kernels, vlmfast._C_cuda (built with VLMFAST_CUDA=1).
//
// Like vlmfast._C: device addresses, sizes, strides, a dtype tag, and the CUDA stream to launch
// on (torch's current stream, passed from Python). Launches are asynchronous.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "cuda/patch_embed.cuh"
#include "cuda/rotary.cuh"

namespace py = pybind11;
using Sizes5 = std::array<int64_t, 5>;
using Strides3 = std::array<int64_t, 3>;

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

static vlmfast::cuda::RotaryShape rotary_shape(const Sizes5& sizes, const Strides3& x_strides,
                                               const Strides3& out_strides) {
  vlmfast::cuda::RotaryShape s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], {}, {}};
  for (int i = 0; i < 3; ++i) {
    s.x_strides[i] = x_strides[i];
    s.out_strides[i] = out_strides[i];
  }
  return s;
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "vlmfast CUDA kernels (torch-free; see vlmfast/native for the launchers)";

  m.def(
      "rotary_forward",
      [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, const Sizes5& sizes,
         const Strides3& x_strides, const Strides3& out_strides, int dtype, bool interleaved,
         bool conjugate, uintptr_t stream) {
        vlmfast::cuda::rotary_forward(rotary_shape(sizes, x_strides, out_strides),
                                      ptr<const void>(x), ptr<const float>(cos),
                                      ptr<const float>(sin), ptr<void>(out), dtype, interleaved,
                                      conjugate, stream);
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("sizes"),
      py::arg("x_strides"), py::arg("out_strides"), py::arg("dtype"), py::arg("interleaved"),
      py::arg("conjugate"), py::arg("stream"));

  m.def(
      "rotary_table_backward",
      [](uintptr_t grad, uintptr_t x, uintptr_t grad_cos, uintptr_t grad_sin, const Sizes5& sizes,
         const Strides3& x_strides, const Strides3& grad_strides, int dtype, bool interleaved,
         uintptr_t stream) {
        vlmfast::cuda::rotary_table_backward(rotary_shape(sizes, x_strides, grad_strides),
                                             ptr<const void>(grad), ptr<const void>(x),
                                             ptr<float>(grad_cos), ptr<float>(grad_sin), dtype,
                                             interleaved, stream);
      },
      py::arg("grad"), py::arg("x"), py::arg("grad_cos"), py::arg("grad_sin"), py::arg("sizes"),
      py::arg("x_strides"), py::arg("grad_strides"), py::arg("dtype"), py::arg("interleaved"),
      py::arg("stream"));

  m.def(
      "rope_2d_forward",
      [](uintptr_t positions, int64_t n, uintptr_t inv_freq, int64_t quarter, uintptr_t cos,
         uintptr_t sin, uintptr_t stream) {
        vlmfast::cuda::rope_2d_forward(ptr<const int64_t>(positions), n, ptr<const float>(inv_freq),
                                       quarter, ptr<float>(cos), ptr<float>(sin), stream);
      },
      py::arg("positions"), py::arg("n"), py::arg("inv_freq"), py::arg("quarter"), py::arg("cos"),
      py::arg("sin"), py::arg("stream"));

  // patch_gather: sizes = (B, C, H, W, p), image_strides = element strides of (b, c, h, w).
  m.def(
      "patch_gather",
      [](uintptr_t image, int image_dtype, const std::array<int64_t, 5>& sizes,
         const std::array<int64_t, 4>& image_strides, uintptr_t scale, uintptr_t shift,
         uintptr_t out, int out_dtype, uintptr_t stream) {
        vlmfast::cuda::PatchImage im{ptr<const void>(image), image_dtype, sizes[0], sizes[1],
                                     sizes[2], sizes[3], sizes[4],
                                     {image_strides[0], image_strides[1], image_strides[2],
                                      image_strides[3]}};
        vlmfast::cuda::patch_gather(im, ptr<const float>(scale), ptr<const float>(shift),
                                    ptr<void>(out), out_dtype, stream);
      },
      py::arg("image"), py::arg("image_dtype"), py::arg("sizes"), py::arg("image_strides"),
      py::arg("scale"), py::arg("shift"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"));
}
