// The one Python module of the CPU kernels, vlmfast._C.
//
// Tensors cross this boundary as addresses (Python ints), sizes, strides and a dtype tag; the
// launchers in vlmfast/native/ check them before calling in. Every entry point releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <tuple>

#include "cpu/attention.h"
#include "cpu/contrastive.h"
#include "cpu/decode.h"
#include "cpu/gemm.h"
#include "cpu/hamming.h"
#include "cpu/linear_cross_entropy.h"
#include "cpu/patch_embed.h"
#include "cpu/rope_2d.h"
#include "cpu/rotary.h"
#include "cpu/rms_norm.h"
#include "cpu/swiglu.h"

namespace py = pybind11;
using Sizes5 = std::array<int64_t, 5>;
using Strides3 = std::array<int64_t, 3>;

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

static vlmfast::cpu::RotaryShape rotary_shape(const Sizes5& sizes, const Strides3& x_strides,
                                              const Strides3& out_strides) {
  vlmfast::cpu::RotaryShape s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], {}, {}};
  for (int i = 0; i < 3; ++i) {
    s.x_strides[i] = x_strides[i];
    s.out_strides[i] = out_strides[i];
  }
  return s;
}

// The instruction sets this CPU offers that the multi-versioned kernels can use.
static py::dict cpu_features() {
  py::dict features;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  features["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  features["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  features["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  features["amx_tile"] = static_cast<bool>(__builtin_cpu_supports("amx-tile"));
#endif
#ifdef _OPENMP
  features["openmp"] = true;
#else
  features["openmp"] = false;
#endif
  return features;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmfast CPU kernels (torch-free; see vlmfast/native for the launchers)";
  m.def("cpu_features", &cpu_features);

  // Contrastive losses: features (B, D) with row strides (a_stride, b_stride), feature dim contiguous.
  m.def(
      "infonce_forward",
      [](uintptr_t a, uintptr_t b, int64_t B, int64_t D, int64_t a_stride, int64_t b_stride,
         float scale, uintptr_t row_lse, uintptr_t col_lse, int dtype, int threads) {
        py::gil_scoped_release release;
        return vlmfast::cpu::infonce_forward({B, D, a_stride, b_stride}, ptr<const void>(a),
                                             ptr<const void>(b), scale, ptr<float>(row_lse),
                                             ptr<float>(col_lse), dtype, threads);
      },
      py::arg("a"), py::arg("b"), py::arg("B"), py::arg("D"), py::arg("a_stride"),
      py::arg("b_stride"), py::arg("scale"), py::arg("row_lse"), py::arg("col_lse"),
      py::arg("dtype"), py::arg("threads"));

  m.def(
      "infonce_backward",
      [](uintptr_t a, uintptr_t b, int64_t B, int64_t D, int64_t a_stride, int64_t b_stride,
         float scale, uintptr_t row_lse, uintptr_t col_lse, float grad, uintptr_t grad_a,
         uintptr_t grad_b, int dtype, int threads) {
        py::gil_scoped_release release;
        return vlmfast::cpu::infonce_backward(
            {B, D, a_stride, b_stride}, ptr<const void>(a), ptr<const void>(b), scale,
            ptr<const float>(row_lse), ptr<const float>(col_lse), grad, ptr<void>(grad_a),
            ptr<void>(grad_b), dtype, threads);
      },
      py::arg("a"), py::arg("b"), py::arg("B"), py::arg("D"), py::arg("a_stride"),
      py::arg("b_stride"), py::arg("scale"), py::arg("row_lse"), py::arg("col_lse"),
      py::arg("grad"), py::arg("grad_a"), py::arg("grad_b"), py::arg("dtype"), py::arg("threads"));

  m.def(
      "siglip_forward",
      [](uintptr_t a, uintptr_t b, int64_t B, int64_t D, int64_t a_stride, int64_t b_stride,
         float scale, float bias, int dtype, int threads) {
        py::gil_scoped_release release;
        return vlmfast::cpu::siglip_forward({B, D, a_stride, b_stride}, ptr<const void>(a),
                                            ptr<const void>(b), scale, bias, dtype, threads);
      },
      py::arg("a"), py::arg("b"), py::arg("B"), py::arg("D"), py::arg("a_stride"),
      py::arg("b_stride"), py::arg("scale"), py::arg("bias"), py::arg("dtype"), py::arg("threads"));

  // Returns (grad_scale, grad_bias).
  m.def(
      "siglip_backward",
      [](uintptr_t a, uintptr_t b, int64_t B, int64_t D, int64_t a_stride, int64_t b_stride,
         float scale, float bias, float grad, uintptr_t grad_a, uintptr_t grad_b, int dtype,
         int threads) {
        double scale_bias[2];
        {
          py::gil_scoped_release release;
          vlmfast::cpu::siglip_backward({B, D, a_stride, b_stride}, ptr<const void>(a),
                                        ptr<const void>(b), scale, bias, grad, ptr<void>(grad_a),
                                        ptr<void>(grad_b), scale_bias, dtype, threads);
        }
        return std::make_pair(scale_bias[0], scale_bias[1]);
      },
      py::arg("a"), py::arg("b"), py::arg("B"), py::arg("D"), py::arg("a_stride"),
      py::arg("b_stride"), py::arg("scale"), py::arg("bias"), py::arg("grad"), py::arg("grad_a"),
      py::arg("grad_b"), py::arg("dtype"), py::arg("threads"));

  // Training's SigLIP call: the loss and the gradients of grad * loss from one pass over the logits.
  // Returns (loss, grad_scale, grad_bias).
  m.def(
      "siglip_forward_backward",
      [](uintptr_t a, uintptr_t b, int64_t B, int64_t D, int64_t a_stride, int64_t b_stride,
         float scale, float bias, float grad, uintptr_t grad_a, uintptr_t grad_b, int dtype,
         int threads) {
        double scale_bias[2], loss = 0.0;
        {
          py::gil_scoped_release release;
          vlmfast::cpu::siglip_backward({B, D, a_stride, b_stride}, ptr<const void>(a),
                                        ptr<const void>(b), scale, bias, grad, ptr<void>(grad_a),
                                        ptr<void>(grad_b), scale_bias, dtype, threads, &loss);
        }
        return std::make_tuple(loss, scale_bias[0], scale_bias[1]);
      },
      py::arg("a"), py::arg("b"), py::arg("B"), py::arg("D"), py::arg("a_stride"),
      py::arg("b_stride"), py::arg("scale"), py::arg("bias"), py::arg("grad"), py::arg("grad_a"),
      py::arg("grad_b"), py::arg("dtype"), py::arg("threads"));

  // Decode step of a Llama-style or OPT stack (csrc/cpu/decode.h): shape = (B, D, H, Hkv, E, I,
  // V, layers, max_len, slot, position_rows, embed_rows, kind); scales = (eps, scale, q_scale);
  // layer_table = the address of an int64 (layers, 14) array of each layer's DecodeLayer
  // pointers, in the struct's order; 0 for a null pointer. Positional arguments only: this runs
  // once per token, and keyword matching cost more than the rest of the binding.
  m.def("decode_step", [](const std::array<int64_t, 13>& shape, const std::array<float, 3>& scales,
                          uintptr_t tokens, uintptr_t positions, uintptr_t embed, uintptr_t layer_table,
                          uintptr_t final_norm, uintptr_t final_norm_bias, uintptr_t head, uintptr_t cos,
                          uintptr_t sin, uintptr_t learned_positions, uintptr_t key_mask, uintptr_t logits,
                          int dtype, int threads) {
    namespace c = vlmfast::cpu;
    const c::DecodeShape s{shape[0], shape[1], shape[2],  shape[3],  shape[4],  shape[5],  shape[6],
                           shape[7], shape[8], shape[9], shape[10], shape[11], shape[12],
                           scales[0], scales[1], scales[2]};
    const auto* table = ptr<const uintptr_t>(layer_table);
    std::vector<c::DecodeLayer> layers(static_cast<size_t>(std::max<int64_t>(s.layers, 0)));
    for (size_t l = 0; l < layers.size(); ++l) {
      const uintptr_t* f = table + l * c::kDecodeLayerFields;
      layers[l] = c::DecodeLayer{ptr<const void>(f[0]), ptr<const void>(f[1]), ptr<const void>(f[2]),
                                 ptr<const void>(f[3]), ptr<const void>(f[4]), ptr<const void>(f[5]),
                                 ptr<const void>(f[6]), ptr<const void>(f[7]), ptr<const void>(f[8]),
                                 ptr<const void>(f[9]), ptr<void>(f[10]), ptr<void>(f[11]),
                                 ptr<const void>(f[12]), ptr<const void>(f[13])};
    }
    const c::DecodePositions tables{ptr<const float>(cos), ptr<const float>(sin), ptr<const void>(learned_positions)};
    py::gil_scoped_release release;
    c::decode_step(s, ptr<const int64_t>(tokens), ptr<const int64_t>(positions), ptr<const void>(embed), layers,
                   ptr<const void>(final_norm), ptr<const void>(final_norm_bias), ptr<const void>(head), tables,
                   ptr<bool>(key_mask), ptr<float>(logits), dtype, threads);
  });

  m.def(
      "decode_gemv",
      [](uintptr_t w, uintptr_t bias, uintptr_t x, uintptr_t out, int64_t B, int64_t N, int64_t K,
         int dtype, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::decode_gemv(ptr<const void>(w), ptr<const void>(bias), ptr<const void>(x),
                                  ptr<float>(out), B, N, K, dtype, threads);
      },
      py::arg("w"), py::arg("bias"), py::arg("x"), py::arg("out"), py::arg("B"), py::arg("N"),
      py::arg("K"), py::arg("dtype"), py::arg("threads"));
  m.def("decode_has_avx512_bf16", &vlmfast::cpu::decode_has_avx512_bf16);

  // Hamming pair search (csrc/cpu/hamming.h): the pairs come back as the bytes of an int64 array
  // [i0, j0, i1, j1, ...], which vlmfast/native/hamming.py views with numpy (no copy per pair).
  m.def(
      "hamming_pairs",
      [](uintptr_t hashes, int64_t n, int max_distance, bool banded, int threads) {
        std::vector<int64_t> pairs;
        {
          py::gil_scoped_release release;
          pairs = banded ? vlmfast::cpu::hamming_pairs_banded(ptr<const uint64_t>(hashes), n,
                                                              max_distance, threads)
                         : vlmfast::cpu::hamming_pairs_all(ptr<const uint64_t>(hashes), n,
                                                           max_distance, threads);
        }
        return py::bytes(reinterpret_cast<const char*>(pairs.data()),
                         pairs.size() * sizeof(int64_t));
      },
      py::arg("hashes"), py::arg("n"), py::arg("max_distance"), py::arg("banded"),
      py::arg("threads"));

  m.def(
      "rotary_forward",
      [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, const Sizes5& sizes,
         const Strides3& x_strides, const Strides3& out_strides, int dtype, bool interleaved,
         bool conjugate, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::rotary_forward(rotary_shape(sizes, x_strides, out_strides),
                                     ptr<const void>(x), ptr<const float>(cos),
                                     ptr<const float>(sin), ptr<void>(out), dtype, interleaved,
                                     conjugate, threads);
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("sizes"),
      py::arg("x_strides"), py::arg("out_strides"), py::arg("dtype"), py::arg("interleaved"),
      py::arg("conjugate"), py::arg("threads"));

  m.def(
      "rms_norm_forward",
      [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t D, double eps, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::rms_norm_forward(ptr<const float>(x), ptr<const float>(w), ptr<float>(y), ptr<float>(rstd),
                                       rows, D, static_cast<float>(eps), threads);
      },
      py::arg("x"), py::arg("w"), py::arg("y"), py::arg("rstd"), py::arg("rows"), py::arg("D"), py::arg("eps"),
      py::arg("threads"));

  m.def(
      "rms_norm_backward",
      [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, uintptr_t dw, int64_t rows,
         int64_t D, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::rms_norm_backward(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(w),
                                        ptr<const float>(rstd), ptr<float>(dx), ptr<float>(dw), rows, D, threads);
      },
      py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("rows"),
      py::arg("D"), py::arg("threads"));

  m.def(
      "swiglu_forward",
      [](uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t I, int64_t stride, int dtype, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::swiglu_forward({rows, I, stride}, ptr<const void>(gate_up), ptr<void>(out), dtype, threads);
      },
      py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("I"), py::arg("stride"), py::arg("dtype"),
      py::arg("threads"));

  m.def(
      "swiglu_backward",
      [](uintptr_t grad, uintptr_t gate_up, uintptr_t grad_gate_up, int64_t rows, int64_t I, int64_t stride,
         int dtype, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::swiglu_backward({rows, I, stride}, ptr<const void>(grad), ptr<const void>(gate_up),
                                      ptr<void>(grad_gate_up), dtype, threads);
      },
      py::arg("grad"), py::arg("gate_up"), py::arg("grad_gate_up"), py::arg("rows"), py::arg("I"),
      py::arg("stride"), py::arg("dtype"), py::arg("threads"));

  m.def(
      "rotary_table_backward",
      [](uintptr_t grad, uintptr_t x, uintptr_t grad_cos, uintptr_t grad_sin, const Sizes5& sizes,
         const Strides3& x_strides, const Strides3& grad_strides, int dtype, bool interleaved,
         int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::rotary_table_backward(rotary_shape(sizes, x_strides, grad_strides),
                                            ptr<const void>(grad), ptr<const void>(x),
                                            ptr<float>(grad_cos), ptr<float>(grad_sin), dtype,
                                            interleaved, threads);
      },
      py::arg("grad"), py::arg("x"), py::arg("grad_cos"), py::arg("grad_sin"), py::arg("sizes"),
      py::arg("x_strides"), py::arg("grad_strides"), py::arg("dtype"), py::arg("interleaved"),
      py::arg("threads"));

  m.def(
      "rope_2d_forward",
      [](uintptr_t positions, int64_t n, uintptr_t inv_freq, int64_t quarter, uintptr_t cos,
         uintptr_t sin, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::rope_2d_forward(ptr<const int64_t>(positions), n, ptr<const float>(inv_freq),
                                      quarter, ptr<float>(cos), ptr<float>(sin), threads);
      },
      py::arg("positions"), py::arg("n"), py::arg("inv_freq"), py::arg("quarter"), py::arg("cos"),
      py::arg("sin"), py::arg("threads"));

  // patch_embed: sizes = (B, C, H, W, p), image_strides = element strides of (b, c, h, w).
  m.def(
      "patch_embed_forward",
      [](uintptr_t image, int image_dtype, const std::array<int64_t, 5>& sizes,
         const std::array<int64_t, 4>& image_strides, uintptr_t weight, uintptr_t bias, int64_t D,
         int weight_dtype, uintptr_t scale, uintptr_t shift, uintptr_t out, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::PatchImage im{ptr<const void>(image), image_dtype, sizes[0], sizes[1],
                                    sizes[2], sizes[3], sizes[4],
                                    {image_strides[0], image_strides[1], image_strides[2],
                                     image_strides[3]}};
        vlmfast::cpu::patch_embed_forward(im, ptr<const void>(weight), ptr<const void>(bias), D,
                                          weight_dtype, ptr<const float>(scale),
                                          ptr<const float>(shift), ptr<void>(out), threads);
      },
      py::arg("image"), py::arg("image_dtype"), py::arg("sizes"), py::arg("image_strides"),
      py::arg("weight"), py::arg("bias"), py::arg("D"), py::arg("weight_dtype"), py::arg("scale"),
      py::arg("shift"), py::arg("out"), py::arg("threads"));

  m.def(
      "patch_gather",
      [](uintptr_t image, int image_dtype, const std::array<int64_t, 5>& sizes,
         const std::array<int64_t, 4>& image_strides, uintptr_t scale, uintptr_t shift,
         uintptr_t out, int out_dtype, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::PatchImage im{ptr<const void>(image), image_dtype, sizes[0], sizes[1],
                                    sizes[2], sizes[3], sizes[4],
                                    {image_strides[0], image_strides[1], image_strides[2],
                                     image_strides[3]}};
        vlmfast::cpu::patch_gather(im, ptr<const float>(scale), ptr<const float>(shift),
                                   ptr<void>(out), out_dtype, threads);
      },
      py::arg("image"), py::arg("image_dtype"), py::arg("sizes"), py::arg("image_strides"),
      py::arg("scale"), py::arg("shift"), py::arg("out"), py::arg("out_dtype"), py::arg("threads"));

  m.def(
      "patch_embed_weight_grad",
      [](uintptr_t image, int image_dtype, const std::array<int64_t, 5>& sizes,
         const std::array<int64_t, 4>& image_strides, uintptr_t scale, uintptr_t shift,
         uintptr_t grad, int64_t D, int64_t ldg, uintptr_t grad_weight, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::PatchImage im{ptr<const void>(image), image_dtype, sizes[0], sizes[1],
                                    sizes[2], sizes[3], sizes[4],
                                    {image_strides[0], image_strides[1], image_strides[2],
                                     image_strides[3]}};
        vlmfast::cpu::patch_embed_weight_grad(im, ptr<const float>(scale), ptr<const float>(shift),
                                              ptr<const float>(grad), D, ldg,
                                              ptr<float>(grad_weight), threads);
      },
      py::arg("image"), py::arg("image_dtype"), py::arg("sizes"), py::arg("image_strides"),
      py::arg("scale"), py::arg("shift"), py::arg("grad"), py::arg("D"), py::arg("ldg"),
      py::arg("grad_weight"), py::arg("threads"));

  // Attention (csrc/cpu/attention.h): sizes = (B, H, Hkv, L, S, E); strides of dims 0-2 per
  // tensor (the head dim is contiguous); bias = 0 for none, else float32 read through 4 strides.
  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t bias, uintptr_t out, uintptr_t lse,
         const std::array<int64_t, 6>& sizes, const Strides3& q_strides, const Strides3& k_strides,
         const Strides3& v_strides, const std::array<int64_t, 4>& bias_strides,
         const Strides3& out_strides, float scale, bool is_causal, int dtype, int threads,
         uintptr_t rotary_cos, uintptr_t rotary_sin, int64_t rotary_half, int64_t rotary_stride,
         uintptr_t mask) {
        py::gil_scoped_release release;
        namespace c = vlmfast::cpu;
        const c::AttentionShape shape{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5],
                                      scale, is_causal, ptr<const float>(rotary_cos),
                                      ptr<const float>(rotary_sin), rotary_half, rotary_stride};
        auto in = [](uintptr_t a, const Strides3& s) {
          return c::AttentionInput{ptr<const void>(a), {s[0], s[1], s[2]}};
        };
        // mask (bool, read through bias_strides) replaces a float bias: pass one or the other.
        const c::AttentionBias b{ptr<const float>(bias),
                                 {bias_strides[0], bias_strides[1], bias_strides[2], bias_strides[3]},
                                 ptr<const uint8_t>(mask)};
        c::attention_forward(shape, in(q, q_strides), in(k, k_strides), in(v, v_strides), b,
                             c::AttentionOutput{ptr<void>(out), {out_strides[0], out_strides[1], out_strides[2]}},
                             ptr<float>(lse), dtype, threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("out"), py::arg("lse"),
      py::arg("sizes"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("bias_strides"), py::arg("out_strides"), py::arg("scale"), py::arg("is_causal"),
      py::arg("dtype"), py::arg("threads"), py::arg("rotary_cos") = 0, py::arg("rotary_sin") = 0,
      py::arg("rotary_half") = 0, py::arg("rotary_stride") = 0, py::arg("mask") = 0);

  // Packed sequences (csrc/cpu/attention.h: attention_varlen_forward): sizes = (T, H, Hkv, E);
  // token and head strides per tensor; cu_seqlens = the address of int32 (sequences + 1,);
  // lse = 0 for none, else float32 (H, T).
  m.def(
      "attention_varlen_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens,
         int64_t sequences, const std::array<int64_t, 4>& sizes, const std::array<int64_t, 2>& q_strides,
         const std::array<int64_t, 2>& k_strides, const std::array<int64_t, 2>& v_strides,
         const std::array<int64_t, 2>& out_strides, float scale, bool is_causal, int dtype,
         int threads, uintptr_t rotary_cos, uintptr_t rotary_sin, int64_t rotary_half,
         int64_t rotary_stride) {
        py::gil_scoped_release release;
        namespace c = vlmfast::cpu;
        const c::AttentionShape shape{1, sizes[1], sizes[2], sizes[0], sizes[0], sizes[3],
                                      scale, is_causal, ptr<const float>(rotary_cos),
                                      ptr<const float>(rotary_sin), rotary_half, rotary_stride};
        // (token stride, head stride) -> the dense (batch, head, position) strides
        auto in = [](uintptr_t a, const std::array<int64_t, 2>& s) {
          return c::AttentionInput{ptr<const void>(a), {0, s[1], s[0]}};
        };
        c::attention_varlen_forward(shape, ptr<const int32_t>(cu_seqlens), sequences, in(q, q_strides),
                                    in(k, k_strides), in(v, v_strides),
                                    c::AttentionOutput{ptr<void>(out), {0, out_strides[1], out_strides[0]}},
                                    ptr<float>(lse), dtype, threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"),
      py::arg("sequences"), py::arg("sizes"), py::arg("q_strides"), py::arg("k_strides"),
      py::arg("v_strides"), py::arg("out_strides"), py::arg("scale"), py::arg("is_causal"),
      py::arg("dtype"), py::arg("threads"), py::arg("rotary_cos") = 0, py::arg("rotary_sin") = 0,
      py::arg("rotary_half") = 0, py::arg("rotary_stride") = 0);

  m.def(
      "attention_backward",
      [](uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
         uintptr_t bias, uintptr_t dq, uintptr_t dk, uintptr_t dv,
         const std::array<int64_t, 6>& sizes, const Strides3& grad_out_strides,
         const Strides3& q_strides, const Strides3& k_strides, const Strides3& v_strides,
         const Strides3& out_strides, const std::array<int64_t, 4>& bias_strides,
         const Strides3& dq_strides, const Strides3& dk_strides, const Strides3& dv_strides,
         float scale, bool is_causal, int dtype, int threads, int strategy, uintptr_t rotary_cos,
         uintptr_t rotary_sin, int64_t rotary_half, int64_t rotary_stride) {
        py::gil_scoped_release release;
        namespace c = vlmfast::cpu;
        const c::AttentionShape shape{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5],
                                      scale, is_causal, ptr<const float>(rotary_cos),
                                      ptr<const float>(rotary_sin), rotary_half, rotary_stride};
        auto in = [](uintptr_t a, const Strides3& s) {
          return c::AttentionInput{ptr<const void>(a), {s[0], s[1], s[2]}};
        };
        auto outp = [](uintptr_t a, const Strides3& s) {
          return c::AttentionOutput{ptr<void>(a), {s[0], s[1], s[2]}};
        };
        const c::AttentionBias b{ptr<const float>(bias),
                                 {bias_strides[0], bias_strides[1], bias_strides[2], bias_strides[3]}};
        c::attention_backward(shape, in(grad_out, grad_out_strides), in(q, q_strides),
                              in(k, k_strides), in(v, v_strides), in(out, out_strides),
                              ptr<const float>(lse), b, outp(dq, dq_strides), outp(dk, dk_strides),
                              outp(dv, dv_strides), dtype, threads, strategy);
      },
      py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
      py::arg("lse"), py::arg("bias"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("sizes"), py::arg("grad_out_strides"), py::arg("q_strides"), py::arg("k_strides"),
      py::arg("v_strides"), py::arg("out_strides"), py::arg("bias_strides"),
      py::arg("dq_strides"), py::arg("dk_strides"), py::arg("dv_strides"), py::arg("scale"),
      py::arg("is_causal"), py::arg("dtype"), py::arg("threads"), py::arg("strategy"),
      py::arg("rotary_cos") = 0, py::arg("rotary_sin") = 0, py::arg("rotary_half") = 0,
      py::arg("rotary_stride") = 0);

  // Linear + cross-entropy (csrc/cpu/linear_cross_entropy.h): sizes = (N, D, V), strides = the
  // row strides of hidden and weight; bias, row_scale, grad_* = 0 for none (row_scale = 0: no
  // gradients).
  m.def(
      "linear_cross_entropy",
      [](uintptr_t hidden, uintptr_t weight, uintptr_t bias, uintptr_t labels,
         const std::array<int64_t, 3>& sizes, const std::array<int64_t, 2>& strides,
         int64_t ignore_index, float label_smoothing, int64_t block_rows, uintptr_t lse,
         uintptr_t loss_rows,
         uintptr_t row_scale, uintptr_t grad_hidden, uintptr_t grad_weight, uintptr_t grad_bias,
         int dtype, int threads) {
        py::gil_scoped_release release;
        vlmfast::cpu::linear_cross_entropy(
            {sizes[0], sizes[1], sizes[2], strides[0], strides[1]}, ptr<const void>(hidden),
            ptr<const void>(weight), ptr<const float>(bias), ptr<const int64_t>(labels),
            {ignore_index, label_smoothing, block_rows}, ptr<float>(lse), ptr<float>(loss_rows),
            ptr<const float>(row_scale), ptr<void>(grad_hidden), ptr<void>(grad_weight),
            ptr<float>(grad_bias), dtype, threads);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("sizes"),
      py::arg("strides"), py::arg("ignore_index"), py::arg("label_smoothing"),
      py::arg("block_rows"), py::arg("lse"),
      py::arg("loss_rows"), py::arg("row_scale"), py::arg("grad_hidden"), py::arg("grad_weight"),
      py::arg("grad_bias"), py::arg("dtype"), py::arg("threads"));

  // GEMM of the Linear layers (csrc/cpu/gemm.h): matrices as (address, (row stride, column
  // stride) in elements, dtype tag); bias (float32), pre = 0 for none; activation =
  // ACTIVATION_TAGS, format = FORMAT_NAMES, isa names = ISA_NAMES of vlmfast/native/linear.py.
  namespace c = vlmfast::cpu;
  m.def("gemm_isa", [] { return std::string(c::gemm_isa_name(c::gemm_isa())); });
  m.def(
      "gemm_force_isa",
      [](int isa) { return std::string(c::gemm_isa_name(c::gemm_force_isa(isa))); },
      py::arg("isa"));
  m.def(
      "gemm_isa_available",
      [](int isa) { return c::gemm_isa_available(static_cast<c::GemmIsa>(isa)); }, py::arg("isa"));
  m.def("gemm_emulate_amx", &c::gemm_emulate_amx, py::arg("on"));
  m.def(
      "gemm_kernel_calls",
      [](int isa) { return c::gemm_kernel_calls(static_cast<c::GemmIsa>(isa)); }, py::arg("isa"));
  m.def(
      "gemm_packed_format",
      [](int compute_dtype) { return static_cast<int>(c::gemm_packed_format(compute_dtype)); },
      py::arg("compute_dtype"));
  m.def(
      "gemm_packed_b_bytes",
      [](int64_t N, int64_t K, int format) {
        return c::gemm_packed_b_bytes(N, K, static_cast<c::PackedFormat>(format));
      },
      py::arg("N"), py::arg("K"), py::arg("format"));
  m.def(
      "gemm_pack_b",
      [](uintptr_t b, const std::array<int64_t, 2>& b_strides, int b_dtype, int64_t N, int64_t K,
         int compute_dtype, int format, uintptr_t packed, int threads) {
        py::gil_scoped_release release;
        c::gemm_pack_b({ptr<const void>(b), b_strides[0], b_strides[1], b_dtype}, N, K,
                       compute_dtype, static_cast<c::PackedFormat>(format), ptr<void>(packed),
                       threads);
      },
      py::arg("b"), py::arg("b_strides"), py::arg("b_dtype"), py::arg("N"), py::arg("K"),
      py::arg("compute_dtype"), py::arg("format"), py::arg("packed"), py::arg("threads"));
  m.def(
      "gemm_forward",
      [](uintptr_t a, const std::array<int64_t, 2>& a_strides, int a_dtype, uintptr_t b_packed,
         int format, int compute_dtype, uintptr_t bias, int64_t M, int64_t N, int64_t K,
         int activation, uintptr_t out, int out_dtype, int64_t ldo, uintptr_t pre, int64_t ldp,
         int threads) {
        py::gil_scoped_release release;
        c::gemm_forward({ptr<const void>(a), a_strides[0], a_strides[1], a_dtype},
                        ptr<const void>(b_packed), static_cast<c::PackedFormat>(format),
                        compute_dtype, ptr<const float>(bias), M, N, K, activation, ptr<void>(out),
                        out_dtype, ldo, ptr<void>(pre), ldp, threads);
      },
      py::arg("a"), py::arg("a_strides"), py::arg("a_dtype"), py::arg("b_packed"),
      py::arg("format"), py::arg("compute_dtype"), py::arg("bias"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("activation"), py::arg("out"), py::arg("out_dtype"), py::arg("ldo"),
      py::arg("pre"), py::arg("ldp"), py::arg("threads"));
  m.def(
      "gemm_packs_in_tasks",
      [](int64_t M, int64_t N, int compute_dtype, int threads) {
        return c::gemm_packs_in_tasks(M, N, compute_dtype, threads);
      },
      py::arg("M"), py::arg("N"), py::arg("compute_dtype"), py::arg("threads"));
  m.def(
      "gemm_forward_unpacked",
      [](uintptr_t a, const std::array<int64_t, 2>& a_strides, int a_dtype, uintptr_t b,
         const std::array<int64_t, 2>& b_strides, int b_dtype, int compute_dtype, uintptr_t bias, int64_t M,
         int64_t N, int64_t K, int activation, uintptr_t out, int out_dtype, int64_t ldo, uintptr_t pre,
         int64_t ldp, int threads) {
        py::gil_scoped_release release;
        c::gemm_forward_unpacked({ptr<const void>(a), a_strides[0], a_strides[1], a_dtype},
                                 {ptr<const void>(b), b_strides[0], b_strides[1], b_dtype}, compute_dtype,
                                 ptr<const float>(bias), M, N, K, activation, ptr<void>(out), out_dtype, ldo,
                                 ptr<void>(pre), ldp, threads);
      },
      py::arg("a"), py::arg("a_strides"), py::arg("a_dtype"), py::arg("b"), py::arg("b_strides"),
      py::arg("b_dtype"), py::arg("compute_dtype"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("activation"), py::arg("out"), py::arg("out_dtype"), py::arg("ldo"), py::arg("pre"),
      py::arg("ldp"), py::arg("threads"));
  m.def(
      "linear_epilogue_backward",
      [](uintptr_t grad, uintptr_t pre, uintptr_t grad_pre, uintptr_t grad_bias, int64_t M,
         int64_t N, int activation, int dtype, int threads) {
        py::gil_scoped_release release;
        c::linear_epilogue_backward(ptr<const void>(grad), ptr<const void>(pre),
                                    ptr<void>(grad_pre), ptr<float>(grad_bias), M, N, activation,
                                    dtype, threads);
      },
      py::arg("grad"), py::arg("pre"), py::arg("grad_pre"), py::arg("grad_bias"), py::arg("M"),
      py::arg("N"), py::arg("activation"), py::arg("dtype"), py::arg("threads"));
  m.def(
      "gemm_measure_peak",
      [](int compute_dtype, double ms, int threads) {
        py::gil_scoped_release release;
        return c::gemm_measure_peak(compute_dtype, ms, threads);
      },
      py::arg("compute_dtype"), py::arg("ms"), py::arg("threads"));
  m.def("gemm_describe", &c::gemm_describe);
}
