"""Triton kernels for patch embedding, and their launchers.

The GEMM out (B * N, D) = patches (B * N, K) @ weight (D, K)^T + bias never sees a patch matrix:
each K step of the loop gathers its (BLOCK_M, BLOCK_K) tile of patches straight from the image
(row r = patch (b, py, px), column k = (c, i, j)), normalises it (x * scale[c] + shift[c], float32)
and rounds it to the weight's dtype, as the reference rounds the normalised image, before tl.dot.
The image is addressed by the strides of its logical (b, c, h, w) dims, so uint8 (B, H, W, C) and
float (B, C, H, W) share one kernel. The patch size is a compile-time constant (one compile per
p in use: 14, 16, 32 in practice), so the (c, i, j) index arithmetic divides by constants.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels._common import INTERPRETING, to_dtype_of
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.layout import channels_first


@triton.jit
def _patch_tile(img_ptr, scale_ptr, shift_ptr, rows, k, ROWS, K, N, GRID_W, P,
                s_b, s_c, s_h, s_w):
    """(BLOCK_M, BLOCK_K) normalised float32 patch values; zero outside the matrix."""
    # patch row r -> (b, py, px); column k -> (c, i, j) with k = c * P * P + i * P + j
    b, n = rows // N, rows % N
    py, px = n // GRID_W, n % GRID_W
    row_offset = b * s_b + py * P * s_h + px * P * s_w
    c, within = k // (P * P), k % (P * P)
    i, j = within // P, within % P
    col_offset = c * s_c + i * s_h + j * s_w
    mask = (rows < ROWS)[:, None] & (k < K)[None, :]
    x = tl.load(img_ptr + row_offset[:, None] + col_offset[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=k < K, other=0.0)
    shift = tl.load(shift_ptr + c, mask=k < K, other=0.0)
    return tl.where(mask, x * scale[None, :] + shift[None, :], 0.0)


@triton.jit
def _patch_embed_kernel(
    img_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr,
    ROWS, D, K, N, GRID_W,
    s_b, s_c, s_h, s_w,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Column blocks vary fastest in launch order: the D / BLOCK_N programs that gather the same
    # patch rows run together, so the image is read from HBM about once and then hit in L2.
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(D, BLOCK_N)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(img_ptr, scale_ptr, shift_ptr, rows, k, ROWS, K, N, GRID_W, P,
                        s_b, s_c, s_h, s_w)
        a = to_dtype_of(a, w_ptr, ROUND_BF16)
        # weight (D, K) row-major, read as its transpose (BLOCK_K, BLOCK_N)
        w = tl.load(w_ptr + cols[None, :] * K + k[:, None],
                    mask=(k < K)[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            # The interpreter's tl.dot misreads bfloat16 (numpy has no such type): multiply the
            # rounded bf16 values in float32, which is what the GPU's bf16 MMA computes too.
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * D + cols[None, :]
    tl.store(out, to_dtype_of(acc, out_ptr, ROUND_BF16), mask=(rows < ROWS)[:, None] & col_ok[None, :])


@triton.jit
def _patch_gather_kernel(
    img_ptr, scale_ptr, shift_ptr, out_ptr, ROWS, K, N, GRID_W, s_b, s_c, s_h, s_w,
    P: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = _patch_tile(img_ptr, scale_ptr, shift_ptr, rows, k, ROWS, K, N, GRID_W, P,
                    s_b, s_c, s_h, s_w)
    mask = (rows < ROWS)[:, None] & (k < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + k[None, :], to_dtype_of(x, out_ptr, ROUND_BF16), mask=mask)


def _geometry(images: torch.Tensor, patch: int):
    """(B, C, H / p, W / p) and the (b, c, h, w) element strides of uint8 BHWC or float BCHW."""
    view = channels_first(images)
    b, c, h, w = view.shape
    return (b, c, h // patch, w // patch), view.stride()


def _gemm_blocks(device: torch.device) -> dict:
    if device.type == "cpu":  # the interpreter: small tiles keep numpy quick
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}


def forward(images, weight, bias, scale, shift) -> torch.Tensor:
    """(B, N, D) in weight's dtype."""
    record("patch_embed", "triton")
    record("patch_embed", "triton")
    patch, d = weight.shape[-1], weight.shape[0]
    (b, c, gh, gw), strides = _geometry(images, patch)
    n, k = gh * gw, c * patch * patch
    rows = b * n
    weight = weight.reshape(d, k).contiguous()
    out = _alloc.empty(b, n, d, dtype=weight.dtype, device=weight.device)
    blocks = _gemm_blocks(weight.device)
    grid = (triton.cdiv(d, blocks["BLOCK_N"]) * triton.cdiv(rows, blocks["BLOCK_M"]),)
    _patch_embed_kernel[grid](
        images, weight, bias if bias is not None else weight, scale.float().contiguous(),
        shift.float().contiguous(), out, rows, d, k, n, gw, *strides,
        P=patch, HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32,
        UPCAST=INTERPRETING and weight.dtype == torch.bfloat16, ROUND_BF16=INTERPRETING,
        **blocks,
    )
    return out


def gather(images, patch: int, scale, shift, dtype: torch.dtype) -> torch.Tensor:
    """(B * N, C * p * p) normalised patches in `dtype`."""
    record("patch_gather", "triton")
    record("patch_gather", "triton")
    (b, c, gh, gw), strides = _geometry(images, patch)
    rows, k = b * gh * gw, c * patch * patch
    out = _alloc.empty(rows, k, dtype=dtype, device=images.device)
    block_m, block_k = 32, 64
    _patch_gather_kernel[(triton.cdiv(rows, block_m), triton.cdiv(k, block_k))](
        images, scale.float().contiguous(), shift.float().contiguous(), out, rows, k, gh * gw, gw,
        *strides, P=patch, ROUND_BF16=INTERPRETING, BLOCK_M=block_m, BLOCK_K=block_k,
    )
    return out
