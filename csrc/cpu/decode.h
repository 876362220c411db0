// One decode step of a decoder stack on the CPU, for a few rows at a time: Llama-style (SmolLM2,
// SmolVLM's, LLaVA's and Qwen2-VL's text models) or OPT (BLIP-2's). Entry point bound in
// csrc/bindings.cpp.
//
// At a few rows a step is weight streaming: every weight is read once per step, so the step is
// one call (one OpenMP region, barriers between the stages) over the plain row-major weights,
// with no second (packed) copy of them and no Python between the layers. Per layer (Llama):
//   x += o_proj(attention(rotary(qkv(rms_norm(x)))))     keys/values written into the cache
//   x += down(silu(gate) * up),  [gate; up] = gate_up(rms_norm(x))
// then logits = head(rms_norm(x)). OPT (pre-norm): LayerNorms with a bias, learned positions
// added to the token embedding, the queries scaled after their projection, no rotary, and
//   x += fc2(relu(fc1(layer_norm(x)))).
// Dot products accumulate in float32 (AVX512-BF16 vdpbf16ps for bfloat16 weights where the CPU
// has it); every intermediate is rounded to the model's dtype at the points where the eager model
// rounds it, so bfloat16 results stay as close to the reference as the eager path's.
#pragma once

#include <cstdint>
#include <vector>

namespace vlmfast::cpu {

// The decoder families: what differs inside a layer (see the top of this file).
enum DecodeKind : int64_t {
  kDecodeLlama = 0,  // RMSNorm, rotary q / k, SwiGLU: gate_up = [gate; up]
  kDecodeOPT = 1,    // LayerNorm (+ bias), learned positions, q * q_scale, ReLU: gate_up = fc1, down = fc2
};

struct DecodeShape {
  int64_t B;             // rows, one new token each
  int64_t D;             // hidden size
  int64_t H, Hkv, E;     // query heads, key/value heads (H % Hkv == 0), head dim (even)
  int64_t I;             // MLP intermediate size
  int64_t V;             // head rows (vocabulary)
  int64_t layers;
  int64_t max_len;       // cache slots per row
  int64_t slot;          // the slot this step writes; attention reads slots [0, slot]
  int64_t position_rows; // rows of the position tables (rotary cos / sin, or learned; positions index them)
  int64_t embed_rows;    // rows of the embedding (tokens index them)
  int64_t kind;          // DecodeKind
  float eps;             // RMSNorm / LayerNorm epsilon
  float scale;           // softmax scale of the scores
  float q_scale;         // OPT: the queries' scale, applied (and rounded) before the scores
};

// One layer's tensors, all contiguous, in the model's dtype. Weights are (out, in) row-major
// (nn.Linear's layout); a null bias means none.
struct DecodeLayer {
  const void* input_norm;    // (D,) (null: OPT's LayerNorm without elementwise affine)
  const void* qkv;           // ((H + 2 Hkv) E, D): q heads, k heads, v heads
  const void* qkv_bias;      // ((H + 2 Hkv) E,) or null
  const void* o_proj;        // (D, H E)
  const void* o_bias;        // (D,) or null
  const void* post_norm;     // (D,)
  const void* gate_up;       // (2 I, D): gate rows then up rows (OPT: fc1, (I, D))
  const void* gate_up_bias;  // (2 I,) or null (OPT: (I,))
  const void* down;          // (D, I)
  const void* down_bias;     // (D,) or null
  void* k_cache;             // (B, Hkv, max_len, E)
  void* v_cache;             // (B, Hkv, max_len, E)
  const void* input_norm_bias;  // (D,): OPT's LayerNorm bias, else null
  const void* post_norm_bias;   // (D,): OPT's LayerNorm bias, else null
};
constexpr int kDecodeLayerFields = 14;  // pointers per DecodeLayer (Python passes them flat)

// Where the rows' positions come from: rotary tables (Llama) or a learned table added to the
// token embedding (OPT), position_rows rows each.
struct DecodePositions {
  const float* cos = nullptr;    // (position_rows, E/2) float32
  const float* sin = nullptr;
  const void* learned = nullptr; // (position_rows, D) in the model's dtype
};

// tokens int64 (B,) index embed (rows of D); positions int64 (B,) index the position tables (a
// table for every position a sequence reaches, built once, so a step computes no angles).
// key_mask bool (B, max_len), true on slots that hold real tokens: the step marks `slot` real and
// attends only real slots (null: all of [0, slot] are real, nothing written); final_norm_bias:
// OPT's, else null; logits float32 (B, V), written. dtype: Float32 or BFloat16
// (csrc/common/dtype.h tags).
void decode_step(const DecodeShape& shape, const int64_t* tokens, const int64_t* positions,
                 const void* embed, const std::vector<DecodeLayer>& layers, const void* final_norm,
                 const void* final_norm_bias, const void* head, const DecodePositions& tables,
                 bool* key_mask, float* logits, int dtype, int threads);

// out (B, N) float32 = x (B, K) @ w (N, K)^T (+ bias), rounded to the dtype, rows of w split
// between threads: the
// matrix-vector kernel of decode_step, exposed for its tests and benchmark.
void decode_gemv(const void* w, const void* bias, const void* x, float* out, int64_t B, int64_t N,
                 int64_t K, int dtype, int threads);

// Whether the bfloat16 dot products run on AVX512-BF16 here (else a float32 fallback).
bool decode_has_avx512_bf16();

}  // namespace vlmfast::cpu
