"""Launchers of the CPU decode kernels in csrc/cpu/decode.cpp (a whole decoder stack per call).

The caller (vlmfast/models/smolvlm/fast_decode.py, with its layouts) checks shapes, dtypes and contiguity once per
model; these functions only pass addresses.
"""

import torch

from vlmfast import _extension
from vlmfast.native._common import dtype_tag
from vlmfast.runtime import alloc as _alloc
from vlmfast.runtime import checks as _checks

# Must match csrc/cpu/decode.h (kDecodeLayerFields and the field order of DecodeLayer).
LAYER_FIELDS = ("input_norm", "qkv", "qkv_bias", "o_proj", "o_bias", "post_norm", "gate_up", "gate_up_bias",
                "down", "down_bias", "k_cache", "v_cache", "input_norm_bias", "post_norm_bias")
# csrc/cpu/decode.h's DecodeKind: the decoder family of a step
LLAMA, OPT = 0, 1


def module():
    """vlmfast._C when it has the decode kernels, else None."""
    native = _extension.load("_C")
    return native if native is not None and hasattr(native, "decode_step") else None


def has_avx512_bf16() -> bool:
    native = module()
    return bool(native is not None and native.decode_has_avx512_bf16())


def layer_table(layers: list[dict]) -> torch.Tensor:
    """int64 (len(layers), 14): each layer's tensors' addresses in LAYER_FIELDS order (0 for a
    missing bias). The tensors must stay alive (and in place) while the table is used."""
    rows = [[0 if layer.get(name) is None else layer[name].data_ptr() for name in LAYER_FIELDS] for layer in layers]
    return torch.tensor(rows, dtype=torch.int64)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def step(shape: tuple, kind: int, scales: tuple, tokens: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor,
         table: torch.Tensor, final_norm: torch.Tensor | None, final_norm_bias: torch.Tensor | None, head: torch.Tensor,
         cos: torch.Tensor | None, sin: torch.Tensor | None, learned: torch.Tensor | None,
         key_mask: torch.Tensor | None, threads: int) -> torch.Tensor:
    """One decode step. shape = (B, D, H, Hkv, E, I, V, layers, max_len, slot); kind: LLAMA or OPT;
    scales = (norm eps, score scale, query scale); tokens, positions int64 (B,) contiguous; the
    position tables positions index (R rows: every position a sequence reaches): LLAMA's rotary
    cos, sin float32 (R, E/2), OPT's learned (R, D) in the weights' dtype (row p: position p), all
    contiguous; key_mask bool (B, max_len) or None: the step marks `slot` real in it and attends
    real slots only. Writes each layer's keys/values at `slot` and returns logits float32 (B, V).
    A token outside the embedding or a position outside the tables raises ValueError before
    anything is read."""
    logits = _alloc.empty(shape[0], shape[6], dtype=torch.float32, device="cpu")
    rows = (cos if learned is None else learned).shape[0]
    module().decode_step(
        (*shape, rows, embed.shape[0], kind), scales, tokens.data_ptr(), positions.data_ptr(), embed.data_ptr(),
        table.data_ptr(), _address(final_norm), _address(final_norm_bias), head.data_ptr(), _address(cos),
        _address(sin), _address(learned), _address(key_mask), logits.data_ptr(), dtype_tag(embed), threads,
    )
    return logits


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None):
    """x (B, K) @ weight (N, K)^T + bias, float32 (B, N) holding values rounded to weight's dtype:
    decode_step's matrix-vector kernel. All contiguous, one dtype (float32 or bfloat16)."""
    _checks.floating("x", x)
    _checks.rank("x", x, 2, "(B, K)")
    _checks.floating("weight", weight)
    _checks.rank("weight", weight, 2, "(N, K)")
    B, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight: expected (N, K) with K = {K} (x's), got {_checks.shape_of(weight)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected (N,) = ({N},), got {_checks.shape_of(bias)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.bfloat16) or t.dtype != weight.dtype:
            raise TypeError(f"{name}: expected float32 or bfloat16, the dtype of weight ({weight.dtype}), got {t.dtype}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous CPU tensor")
    out = _alloc.empty(B, N, dtype=torch.float32, device=x.device)
    module().decode_gemv(
        w=weight.data_ptr(), bias=0 if bias is None else bias.data_ptr(), x=x.data_ptr(), out=out.data_ptr(),
        B=B, N=N, K=K, dtype=dtype_tag(weight), threads=threads or torch.get_num_threads(),
    )
    return out
