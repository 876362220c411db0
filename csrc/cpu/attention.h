// Fused scaled-dot-product attention on the CPU (flash-attention style): entry points bound in
// csrc/bindings.cpp, launched by vlmfast/native/attention.py.
//
// q: (B, H, L, E); k, v: (B, Hkv, S, E), H % Hkv == 0 (query head h reads kv head h / (H / Hkv)).
// Every tensor is given by its address and the strides (in elements) of its first three dims;
// the head dim E is contiguous. bias (optional, float32) is (B, H, L, S) read through four strides
// (0 for broadcast dims). lse is float32 (B, H, L), contiguous. Scores are
// scale * q.k + bias, top-left causal (query i sees keys j <= i) when `causal`. A row that sees no
// key gets out = 0 and lse = -inf; its gradients are 0.
#pragma once

#include <cstdint>

namespace vlmfast::cpu {

struct AttentionShape {
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim;  // B, H, Hkv, L, S, E
  float scale;
  bool causal;
  // Optional rotary (non-interleaved, rotate-half) applied to q and k as they are packed:
  // float32 cos/sin tables, row p (row stride rotary_stride, >= max(L, S) rows) for position p,
  // rotary_half = R/2 <= E/2 columns; 0 for none. Rotated values are rounded to the inputs'
  // dtype, as apply_rotary_emb's output would be. The backward works in the rotated space and
  // applies the inverse rotation to dq and dk.
  const float* rotary_cos = nullptr;
  const float* rotary_sin = nullptr;
  int64_t rotary_half = 0, rotary_stride = 0;
};

struct AttentionInput {    // a read-only (B, *, *, E) tensor
  const void* data;
  int64_t strides[3];
};

struct AttentionOutput {   // a written (B, *, *, E) tensor
  void* data;
  int64_t strides[3];
};

struct AttentionBias {     // float32 (B, H, L, S), or data == nullptr for none
  const float* data;
  int64_t strides[4];
  // Instead of data: a bool (one byte) (B, H, L, S) mask read through the same strides, false
  // hiding the key (a key-padding mask as given, with no float bias made from it per call).
  const uint8_t* mask = nullptr;
};

// out = softmax(scale * q k^T + bias) v and lse = logsumexp of the scores, per row (lse may be
// nullptr when only out is wanted: inference). Below ~2^18 multiply-adds it runs on one thread
// whatever `threads` says: waking a team costs more than a decode step over a short cache.
void attention_forward(const AttentionShape& shape, AttentionInput q, AttentionInput k,
                       AttentionInput v, AttentionBias bias, AttentionOutput out, float* lse,
                       int dtype, int threads);

// Packed sequences (varlen): q, k, v, out are (T, *, E) with the token stride in strides[2] and
// the head stride in strides[1] (strides[0] unused); segment i is tokens
// [cu_seqlens[i], cu_seqlens[i + 1]) attending to itself only (shape.batch is ignored, q_len is
// T: the lse row stride of the (H, T) float32 lse, or lse = nullptr). Rotary table row p is
// packed token p. No bias. Every segment's jobs share one parallel loop.
void attention_varlen_forward(const AttentionShape& shape, const int32_t* cu_seqlens,
                              int64_t sequences, AttentionInput q, AttentionInput k,
                              AttentionInput v, AttentionOutput out, float* lse, int dtype,
                              int threads);

// How the backward splits its work: dk/dv per (batch, kv head, key block) in every strategy; dq
// either accumulated alongside in a per-task buffer (Fused: one task per (batch, kv head)) or in a
// second pass over query blocks (TwoPass: more, smaller tasks). Auto picks by the task count.
enum class AttentionBackwardStrategy : int { Auto = 0, Fused = 1, TwoPass = 2 };

// dq (like q), dk and dv (like k, v: summed over the query heads of a group) from grad_out,
// recomputing the probabilities from q, k, lse. out and grad_out are (B, H, L, E).
void attention_backward(const AttentionShape& shape, AttentionInput grad_out, AttentionInput q,
                        AttentionInput k, AttentionInput v, AttentionInput out, const float* lse,
                        AttentionBias bias, AttentionOutput dq, AttentionOutput dk,
                        AttentionOutput dv, int dtype, int threads, int strategy);

}  // namespace vlmfast::cpu
