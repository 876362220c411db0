"""Triton kernels for patch embedding, and their launchers.

The GEMM out (B * N, D) = patches (B * N, K) @ weight (D, K)^T + bias never sees a patch matrix:
each K step of the loop gathers its (BLOCK_M, BLOCK_K) tile of patches straight from the image
(row r = patch (b, py, px), column k = (c, i, j)), normalises it (x * scale[c] + shift[c], float32)
and rounds it to the weight's dtype, as the reference rounds the normalised image, before tl.dot.
The image is addressed by the strides of its logical (b, c, h, w) dims, so uint8 (B, H, W, C) and
float (B, C, H, W) share one kernel. The patch size p is a runtime argument: the (b, py, px)
decomposition of the rows is made once per program, the (c, i, j) one of the columns once per K
step on a vector, so one compile serves every p.
"""

import torch
import triton
import triton.language as tl

from vlmfast.kernels import _common
from vlmfast.kernels._common import INTERPRETING, mma, to_dtype_of
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime.kernel_calls import record
from vlmfast.runtime.layout import channels_first


@triton.jit
def _patch_rows(img_ptr, rows, N, GRID_W, P, s_b, s_h, s_w):
    """Pointers to the top-left pixel of each patch row r -> (b, py, px)."""
    b, n = rows // N, rows % N
    py, px = n // GRID_W, n % GRID_W
    return img_ptr + b * s_b + py * P * s_h + px * P * s_w


@triton.jit
def _patch_tile(row_ptrs, row_ok, scale_ptr, shift_ptr, k, K, P, s_c, s_h, s_w):
    """(BLOCK_M, BLOCK_K) normalised float32 patch values; zero outside the matrix."""
    # column k -> (c, i, j) with k = c * P * P + i * P + j
    c, within = k // (P * P), k % (P * P)
    i, j = within // P, within % P
    col_offset = c * s_c + i * s_h + j * s_w
    mask = row_ok[:, None] & (k < K)[None, :]
    x = tl.load(row_ptrs[:, None] + col_offset[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=k < K, other=0.0)
    shift = tl.load(shift_ptr + c, mask=k < K, other=0.0)
    return tl.where(mask, x * scale[None, :] + shift[None, :], 0.0)


@triton.jit
def _patch_embed_kernel(
    img_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr,
    ROWS, D, K, N, GRID_W, P,
    s_b, s_c, s_h, s_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Column blocks vary fastest in launch order: the D / BLOCK_N programs that gather the same
    # patch rows run together, so the image is read from HBM about once and then hit in L2.
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(D, BLOCK_N)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < D
    row_ok = rows < ROWS
    row_ptrs = _patch_rows(img_ptr, rows, N, GRID_W, P, s_b, s_h, s_w)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(row_ptrs, row_ok, scale_ptr, shift_ptr, k, K, P, s_c, s_h, s_w)
        a = to_dtype_of(a, w_ptr, INTERPRETED)
        # weight (D, K) row-major, read as its transpose (BLOCK_K, BLOCK_N)
        w = tl.load(w_ptr + cols[None, :] * K + k[:, None],
                    mask=(k < K)[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * D + cols[None, :]
    tl.store(out, to_dtype_of(acc, out_ptr, INTERPRETED), mask=(rows < ROWS)[:, None] & col_ok[None, :])


@triton.jit
def _patch_gather_kernel(
    img_ptr, scale_ptr, shift_ptr, out_ptr, ROWS, K, N, GRID_W, P, s_b, s_c, s_h, s_w,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ptrs = _patch_rows(img_ptr, rows, N, GRID_W, P, s_b, s_h, s_w)
    x = _patch_tile(row_ptrs, rows < ROWS, scale_ptr, shift_ptr, k, K, P, s_c, s_h, s_w)
    mask = (rows < ROWS)[:, None] & (k < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + k[None, :], to_dtype_of(x, out_ptr, ROUND_BF16), mask=mask)


def _geometry(images: torch.Tensor, patch: int):
    """(B, C, H / p, W / p) and the (b, c, h, w) element strides of uint8 BHWC or float BCHW."""
    view = channels_first(images)
    b, c, h, w = view.shape
    return (b, c, h // patch, w // patch), view.stride()


# ----------------------------------------------------------------------------- configs

# GEMM tile candidates per (target, operand width), the default first (VLMFAST_TUNE=1 times the
# rest on a GPU); each compiles for its target without spills (compile_all checks it).
_TILES = {
    "interpreter": {"fp32": [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)],  # small tiles keep numpy quick
                    "16bit": [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)]},
    "sm_90": {"fp32": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)],
              "16bit": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
                        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)]},
    "sm_80": {"fp32": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)],
              "16bit": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)]},
}
GATHER_TILE = dict(BLOCK_M=32, BLOCK_K=64)


def gemm_tiles(target: str, dtype: torch.dtype) -> list[dict]:
    return _TILES[target]["fp32" if dtype == torch.float32 else "16bit"]


def gemm_grid(rows: int, d: int, block_m: int, block_n: int) -> tuple[int]:
    """1-D: column blocks fastest (see _patch_embed_kernel)."""
    return (triton.cdiv(d, block_n) * triton.cdiv(rows, block_m),)


def gather_grid(rows: int, k: int) -> tuple[int, int]:
    return (triton.cdiv(rows, GATHER_TILE["BLOCK_M"]), triton.cdiv(k, GATHER_TILE["BLOCK_K"]))


def _types(dtype: torch.dtype, image: str) -> dict:
    data = "*" + _common.TRITON_DTYPES[dtype]
    return {"img_ptr": image, "w_ptr": data, "bias_ptr": data, "scale_ptr": "*fp32", "shift_ptr": "*fp32",
            "out_ptr": data}


def variants(target: str) -> list:
    """Every compile the launchers can ask for on `target`, for uint8 (B, H, W, C) and float
    (B, C, H, W) images."""
    out = []
    for dtype in _common.KERNEL_DTYPES:
        for image in ("*u8", "*" + _common.TRITON_DTYPES[dtype]):
            case = f"{'uint8' if image == '*u8' else 'float'} images"
            # Representative launch: 64 images of 224 x 224 x 3, p = 14 (16 x 16 patches), D = 768;
            # (b, c, h, w) strides of uint8 (B, H, W, C) or float (B, C, H, W).
            hw = 224
            strides = (dict(s_b=hw * hw * 3, s_c=1, s_h=hw * 3, s_w=3) if image == "*u8"
                       else dict(s_b=3 * hw * hw, s_c=hw * hw, s_h=hw, s_w=1))
            ints = dict(ROWS=64 * 256, D=768, K=3 * 14 * 14, N=256, GRID_W=16, P=14, **strides)
            for i, config in enumerate(gemm_tiles(target, dtype)):
                out.append(_common.Variant(_patch_embed_kernel, _types(dtype, image), dict(
                    HAS_BIAS=True, PRECISION=_common.dot_precision(dtype), INTERPRETED=False,
                    **_common.tiles(config)), _common.launch_options(config), dtype, i == 0, case, ints))
            out.append(_common.Variant(_patch_gather_kernel, _types(dtype, image), dict(
                ROUND_BF16=False, **GATHER_TILE), {}, dtype, True, case, ints))
    return out


# ----------------------------------------------------------------------------- launchers


def forward(images, weight, bias, scale, shift) -> torch.Tensor:
    """(B, N, D) in weight's dtype."""
    record("patch_embed", "triton")
    patch, d = weight.shape[-1], weight.shape[0]
    (b, c, gh, gw), strides = _geometry(images, patch)
    n, k = gh * gw, c * patch * patch
    rows = b * n
    weight = weight.reshape(d, k).contiguous()
    out = _alloc.empty(b, n, d, dtype=weight.dtype, device=weight.device)
    scale32, shift32 = scale.float().contiguous(), shift.float().contiguous()
    target = _common.target_of(weight.device)

    def run(config):
        return _common.launch(
            _patch_embed_kernel, gemm_grid(rows, d, config["BLOCK_M"], config["BLOCK_N"]),
            images, weight, bias if bias is not None else weight, scale32, shift32, out, rows, d, k, n, gw,
            patch, *strides, HAS_BIAS=bias is not None, PRECISION=_common.dot_precision(weight.dtype),
            INTERPRETED=INTERPRETING, **config,
        )

    run(_common.choose("patch_embed", (target, weight.dtype, images.dtype, patch, triton.next_power_of_2(rows)),
                       gemm_tiles(target, weight.dtype), run))
    return out


def gather(images, patch: int, scale, shift, dtype: torch.dtype) -> torch.Tensor:
    """(B * N, C * p * p) normalised patches in `dtype`."""
    record("patch_gather", "triton")
    (b, c, gh, gw), strides = _geometry(images, patch)
    rows, k = b * gh * gw, c * patch * patch
    out = _alloc.empty(rows, k, dtype=dtype, device=images.device)
    _common.launch(
        _patch_gather_kernel, gather_grid(rows, k),
        images, scale.float().contiguous(), shift.float().contiguous(), out, rows, k, gh * gw, gw, patch,
        *strides, ROUND_BF16=INTERPRETING, **GATHER_TILE,
    )
    return out
