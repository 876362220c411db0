// The GEMM of the models' Linear layers (y = act(x W^T + b)) and its backward pieces, float32 and
// bfloat16 (float16 computed in float32): entry points bound in csrc/bindings.cpp.
//
// Operands are addressed through element strides (Matrix), so the backward's transposed
// operands (dx = dz W, dW = dz^T x) run through the same kernel without copies: only the
// packing reads them differently. B is packed once per call (or once per weight version, by the
// caller) into column panels of 32; A is packed per block of rows inside the kernel.
//
// Instruction sets are chosen at run time (gemm_isa): AMX tiles or AVX512-BF16 for bfloat16
// operands where the CPU (and, for AMX, the OS) allow them, else the float32 kernels (AVX-512,
// AVX2, portable) on operands widened while they are packed. The blocking comes from the CPU's
// cache sizes (csrc/cpu/cpu_info.h), never from one machine's figures.
#pragma once

#include <cstdint>
#include <string>

namespace vlmfast::cpu {

// Fused epilogues; tags shared with Python (vlmfast/native/linear.py: ACTIVATION_TAGS).
enum class Activation : int { None = 0, QuickGelu = 1, GeluTanh = 2, Gelu = 3 };

// Instruction-set levels, lowest to highest; tags shared with Python (ISA_NAMES).
enum class GemmIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };

// Layouts of a packed B (tags shared with Python): float32 panels, or bfloat16 pairs (the
// AVX512-BF16 and AMX kernels' layout, K padded to a multiple of 32).
enum class PackedFormat : int { F32 = 0, Bf16Pairs = 1 };

// Element (i, j) lives at data[i * row_stride + j * col_stride]; dtype: a DType tag
// (csrc/common/dtype.h).
struct Matrix {
  const void* data;
  int64_t row_stride, col_stride;
  int dtype;
};

// The level in use: the best this CPU (and OS) offers, or the one forced (VLMFAST_GEMM_ISA at
// the first call, or gemm_force_isa), lowered to what the CPU can run.
GemmIsa gemm_isa();
// Forces a level (-1: back to automatic); returns the level now in use.
GemmIsa gemm_force_isa(int isa);
const char* gemm_isa_name(GemmIsa isa);
// Whether this CPU can run the level.
bool gemm_isa_available(GemmIsa isa);
// Tests only: the AMX level available on a CPU with AVX512-BF16 but no AMX, on emulated tiles
// (the real kernel's addressing, the tile arithmetic in plain float32; slow). Resets the level.
void gemm_emulate_amx(bool on);
// GEMMs run so far by the kernel of `kernel` (the float32 kernels serve the levels above
// AVX-512 for float32 operands): the tests' proof that a forced path ran.
int64_t gemm_kernel_calls(GemmIsa kernel);

// The packed layout gemm_forward uses for operands computed in `compute_dtype` (a DType tag) at
// the current level.
PackedFormat gemm_packed_format(int compute_dtype);

// Bytes needed to hold B (N x K) packed in `format`.
int64_t gemm_packed_b_bytes(int64_t N, int64_t K, PackedFormat format);

// Packs B (N x K; element (n, k) = b(n, k)) into 32-column panels in `format`, its values
// rounded to `compute_dtype` (bfloat16 or float16 compute of a float32 source, as autocast
// rounds); columns past N and steps past K are zero.
void gemm_pack_b(Matrix b, int64_t N, int64_t K, int compute_dtype, PackedFormat format,
                 void* packed, int threads);

// out (M x N, row stride ldo, dtype out_dtype) = act(A (M x K) B^T + bias); B given packed by
// gemm_pack_b in `format` (A's values rounded to compute_dtype like B's). bias: (N,) float32 or
// null. pre: null, or (M x N, row stride ldp, out_dtype) that receives the pre-activation
// A B^T + bias (what the activation's backward needs). Accumulation is float32 throughout.
void gemm_forward(Matrix a, const void* b_packed, PackedFormat format, int compute_dtype,
                  const float* bias, int64_t M, int64_t N, int64_t K, int activation, void* out,
                  int out_dtype, int64_t ldo, void* pre, int64_t ldp, int threads);

// Whether gemm_forward_unpacked takes this problem: A's M rows fit two cache blocks of rows
// (each slice of B is packed once per block: one block, or two, still read B less than packing
// it whole; at three or more the two ways are even) and N gives every thread two panels or more.
bool gemm_packs_in_tasks(int64_t M, int64_t N, int compute_dtype, int threads);

// gemm_forward with B (N x K; element (n, k) = b(n, k)) unpacked: each task packs the slices of
// B it sweeps as it goes, in the format gemm_packed_format(compute_dtype) gives. For few rows of
// A, where packing B whole (a write and a second read of all of it) costs as much as the
// arithmetic. Only where gemm_packs_in_tasks holds (std::invalid_argument otherwise).
void gemm_forward_unpacked(Matrix a, Matrix b, int compute_dtype, const float* bias, int64_t M, int64_t N,
                           int64_t K, int activation, void* out, int out_dtype, int64_t ldo, void* pre,
                           int64_t ldp, int threads);

// The epilogue's backward over M x N row-major contiguous matrices of `dtype`: grad_pre = grad *
// act'(pre) (skipped, and grad_pre/pre unused, when activation is None), and when grad_bias
// (float32) is not null grad_bias[n] = sum_m grad_pre[m, n] (of grad itself without an
// activation; summed from the unrounded products), in one pass.
void linear_epilogue_backward(const void* grad, const void* pre, void* grad_pre, float* grad_bias,
                              int64_t M, int64_t N, int activation, int dtype, int threads);

// The machine's peak in TFLOP/s for the kernel of `compute_dtype` at the current level, measured
// now with the micro-kernel itself on L1-resident operands (every thread at once, best of a few
// runs of about `ms` milliseconds).
double gemm_measure_peak(int compute_dtype, double ms, int threads);

// What the GEMM chose on this machine: level, caches and blocking, as "key=value" lines.
std::string gemm_describe();

}  // namespace vlmfast::cpu
