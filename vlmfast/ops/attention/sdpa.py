"""Fused attention: scaled_dot_product_attention (a drop-in for torch's, plus fused rotary) and
attention_varlen (packed sequences).

Layers: public functions (validate, turn masks into a float32 additive bias, fall back to torch
for what the kernels do not cover) -> custom ops `vlmfast::attention_fwd` / `_bwd` and
`vlmfast::attention_varlen_fwd` / `_bwd` (fake impls + autograd) -> backend launcher:
kernels/attention.py (Triton: forward with the log-sum-exp, backward recomputing the tiles,
split-KV decode), vlmfast/native/attention.py (C++), or ops/reference.py.

On CUDA, a few queries per kv head (L <= 16: decoding) against a longer KV cache take the
split-KV ("flash-decoding") kernel: the keys are split over programs, then a small kernel
combines the partial results by their log-sum-exp.

On the CPU, an eager call with nothing to differentiate (a decode step) skips the layers: a few
cheap checks, then the C++ launcher directly, with a bool mask read as given (no float bias),
no lse (_lean_cpu_attention); its per-call cost is a few microseconds, below torch's SDPA.
attention_varlen on the C++ backend hands each sequence's rows of the rotary tables to the
dense kernel, which rotates q and k as it packs them (no separate pass).

Rows with no key to attend (every key masked) give zeros and zero gradients, not NaN.
"""

import functools
import math
import os

import torch

from vlmfast.ops import _checks, _dispatch, reference
from vlmfast.ops.rotary import apply_rotary_emb, rotary_fwd

MAX_HEAD_DIM = 256  # the Triton and C++ kernels hold one head-dim row per tile (BLOCK_E <= 256)

# ----------------------------------------------------------------------------- backends


def _rotate(x, cos, sin, conjugate: bool, seq_dim: int):
    """x rotated by the tables (the inverse rotation with `conjugate`), for the backends that
    do not fuse rotary into the kernel."""
    return rotary_fwd(x, cos, sin, False, conjugate, seq_dim)


def _dense_forward(backend, q, k, v, bias, scale, is_causal, cos, sin):
    rotary = None if cos is None else (cos, sin)
    if backend == "triton":
        from vlmfast.kernels import attention as triton_attention

        return triton_attention.forward(q, k, v, scale=scale, is_causal=is_causal, bias=bias,
                                        rotary=rotary)
    if backend == "cpp":
        # The C++ kernel rotates q and k as it packs them (float32 tables, no extra pass).
        return _native().forward(q, k, v, scale=scale, is_causal=is_causal, bias=bias,
                                 rotary=_float32_tables(rotary))
    if rotary is not None:
        q, k = _rotate(q, cos, sin, False, 2), _rotate(k, cos, sin, False, 2)
    return reference.attention_forward(q, k, v, bias, scale, is_causal)


def _float32_tables(rotary):
    """The (cos, sin) tables as the C++ kernel reads them (float32), or None."""
    if rotary is None:
        return None
    return tuple(t.detach().to(torch.float32) for t in rotary)


def _dense_backward(backend, grad, q, k, v, out, lse, bias, scale, is_causal, cos, sin):
    rotary = None if cos is None else (cos, sin)
    if backend == "triton":
        from vlmfast.kernels import attention as triton_attention

        return triton_attention.backward(grad, q, k, v, out, lse, scale=scale, is_causal=is_causal,
                                         bias=bias, rotary=rotary)
    if backend == "cpp":
        # Rotation inside the kernel; dq, dk come back already through its inverse.
        return _native().backward(grad, q, k, v, out, lse, scale=scale, is_causal=is_causal,
                                  bias=bias, rotary=_float32_tables(rotary))
    if rotary is not None:
        q, k = _rotate(q, cos, sin, False, 2), _rotate(k, cos, sin, False, 2)
    dq, dk, dv = reference.attention_backward(grad, q, k, v, out, lse, bias, scale, is_causal)
    if rotary is not None:
        # The rotation is orthogonal: the gradient goes back through its transpose.
        dq, dk = _rotate(dq, cos, sin, True, 2), _rotate(dk, cos, sin, True, 2)
    return dq, dk, dv


@functools.cache
def _native():
    """vlmfast/native/attention.py, imported on first use (an import statement per call shows
    in a decode step)."""
    from vlmfast.native import attention as native_attention

    return native_attention


# There is no CUDA C++ attention kernel: on CUDA tensors Triton is the kernel, and a forced
# VLMFAST_BACKEND=cuda runs it too (the call is still counted as "cuda").
_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}


def _backend(op: str, tensor: torch.Tensor) -> str:
    backend = _dispatch.select(op, tensor.device, tensor.dtype, order=_ORDER)
    return "triton" if backend == "cuda" else backend


# ----------------------------------------------------------------------------- dense custom ops


@torch.library.custom_op("vlmfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
    is_causal: bool, cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, E), lse float32 (B, H, L)) for q (B, H, L, E), k/v (B, Hkv, S, E), an
    optional float32 bias expanded to (B, H, L, S), rotary tables (L, R/2) or None."""
    backend = _backend("attention", q)
    return _dense_forward(backend, q, k, v, bias, scale, is_causal, cos, sin)


@attention_fwd.register_fake
def _(q, k, v, bias, scale, is_causal, cos, sin):
    out = q.new_empty(q.shape)
    return out, q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("vlmfast::attention_bwd", mutates_args=())
def attention_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias: torch.Tensor | None, scale: float, is_causal: bool,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v): dk, dv summed over each GQA group."""
    backend = _backend("attention_bwd", q)
    return _dense_backward(backend, grad, q, k, v, out, lse, bias, scale, is_causal, cos, sin)


@attention_bwd.register_fake
def _(grad, q, k, v, out, lse, bias, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _dense_setup_context(ctx, inputs, output):
    q, k, v, bias, scale, is_causal, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cos, sin)
    ctx.options = (scale, is_causal)


def _dense_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, cos, sin = ctx.saved_tensors
    scale, is_causal = ctx.options
    dq, dk, dv = attention_bwd(grad_out.contiguous(), q, k, v, out, lse, bias, scale, is_causal,
                               cos, sin)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_dense_autograd, setup_context=_dense_setup_context)


# ----------------------------------------------------------------------------- varlen custom ops


def _sequences(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def _as_dense(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Packed rows [start, end) of (T, H, E) as (1, H, end - start, E), a view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


@torch.library.custom_op("vlmfast::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float, is_causal: bool, cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, E), lse float32 (H, T)) for packed q (T, H, E), k/v (T, Hkv, E)."""
    backend = _backend("attention_varlen", q)
    if backend == "triton":
        from vlmfast.kernels import attention as triton_attention

        rotary = None if cos is None else (cos, sin)
        return triton_attention.forward_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale,
                                               is_causal=is_causal, rotary=rotary)
    # The other backends attend each sequence alone through the dense path, which takes the
    # sequence's rows of the tables (row p of the piece = packed row start + p): the C++ kernel
    # rotates q and k as it packs them, with no separate pass over memory.
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_lse_dtype(q))
    for start, end in _sequences(cu_seqlens):
        piece_out, piece_lse = _dense_forward(
            backend, *(_as_dense(t, start, end) for t in (q, k, v)), None, scale, is_causal,
            *_table_rows(cos, sin, start, end))
        out[start:end] = piece_out[0].transpose(0, 1)
        lse[:, start:end] = piece_lse[0]
    return out, lse


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("vlmfast::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, is_causal: bool,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) packed like (q, k, v)."""
    backend = _backend("attention_varlen_bwd", q)
    if backend == "triton":
        from vlmfast.kernels import attention as triton_attention

        rotary = None if cos is None else (cos, sin)
        return triton_attention.backward_varlen(grad, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                scale=scale, is_causal=is_causal, rotary=rotary)
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for start, end in _sequences(cu_seqlens):
        pieces = [_as_dense(t, start, end) for t in (grad, q, k, v, out)]
        piece_lse = lse[:, start:end].unsqueeze(0)
        # With tables, dq and dk come back through the inverse rotation already.
        grads = _dense_backward(backend, *pieces, piece_lse, None, scale, is_causal,
                                *_table_rows(cos, sin, start, end))
        for full, piece in zip((dq, dk, dv), grads):
            full[start:end] = piece[0].transpose(0, 1)
    return dq, dk, dv


def _table_rows(cos, sin, start: int, end: int) -> tuple:
    """The rotary tables' rows [start, end) (views), or (None, None) without rotary."""
    if cos is None:
        return None, None
    return cos[start:end], sin[start:end]


@attention_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, is_causal, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, is_causal, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cos, sin)
    ctx.options = (max_seqlen, scale, is_causal)


def _varlen_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, cos, sin = ctx.saved_tensors
    max_seqlen, scale, is_causal = ctx.options
    dq, dk, dv = attention_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                      max_seqlen, scale, is_causal, cos, sin)
    return dq, dk, dv, None, None, None, None, None, None


attention_varlen_fwd.register_autograd(_varlen_autograd, setup_context=_varlen_setup_context)


# ----------------------------------------------------------------------------- validation


def _check_qkv(query, key, value, layout_q: str, layout_kv: str, ranks, names=("query", "key", "value")):
    q_name, k_name, v_name = names
    for name, t, layout in ((q_name, query, layout_q), (k_name, key, layout_kv), (v_name, value, layout_kv)):
        _checks.floating(name, t)
        _checks.rank(name, t, ranks, layout)
    for name, t in ((k_name, key), (v_name, value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: expected the dtype of {q_name} ({query.dtype}), got {t.dtype}")
    _checks.same_device(**{q_name: query, k_name: key, v_name: value})


def _check_heads(query, key, enable_gqa: bool, kv_layout: str, head_dim_index: int = -3, key_name="key"):
    """H and Hkv (dim `head_dim_index` of query and key): equal, or Hkv dividing H with GQA."""
    heads, kv_heads = query.shape[head_dim_index], key.shape[head_dim_index]
    if enable_gqa:
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(
                f"{key_name}: expected {kv_layout} with a number of heads Hkv dividing H = {heads} "
                f"(grouped-query attention), got {_checks.shape_of(key)}"
            )
    elif kv_heads != heads:
        raise ValueError(
            f"key: expected H = {heads} heads like query (pass enable_gqa=True for grouped-query "
            f"attention), got {_checks.shape_of(key)}"
        )


def _check_rotary(rotary, rows: int, head_dim: int, device, what: str):
    """rotary = (cos, sin), each (rows, R/2) with R <= E."""
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise TypeError(f"rotary: expected a (cos, sin) pair of ({what}, R/2) tensors, got {type(rotary).__name__}")
    cos, sin = rotary
    _checks.floating("rotary cos", cos)
    _checks.floating("rotary sin", sin)
    for name, t in (("rotary cos", cos), ("rotary sin", sin)):
        _checks.rank(name, t, 2, f"({what}, R/2) = ({rows}, R/2)")
        if t.shape[0] != rows or not 1 <= t.shape[1] <= head_dim // 2 or t.shape != cos.shape:
            raise ValueError(
                f"{name}: expected ({what}, R/2) = ({rows}, R/2) with 1 <= R/2 <= E/2 = "
                f"{head_dim // 2}, the same for cos and sin, got {_checks.shape_of(t)}"
            )
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} like query, got {t.device}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return float(scale)


def _mask_to_bias(attn_mask, target: tuple, device, dtype: torch.dtype) -> torch.Tensor:
    """attn_mask (bool: True takes part; float: added) broadcastable to target = (..., L, S) as a
    float32 additive bias expanded (stride 0 where broadcast) to target (float64 for float64
    queries, which run the reference)."""
    _checks.tensor("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask: expected a bool or floating tensor, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask: expected a tensor on {device} like query, got {attn_mask.device}")
    if not _broadcasts_to(attn_mask.shape, target):
        raise ValueError(
            f"attn_mask: expected a shape broadcastable to (..., L, S) = {tuple(target)}, got "
            f"{_checks.shape_of(attn_mask)}"
        )
    if attn_mask.dtype == torch.bool:
        # Converted at the mask's own size (a key-padding mask stays (B, 1, 1, S)), then
        # expanded; one where() instead of zeros + masked_fill (a decode step feels each op).
        bias = torch.where(attn_mask, 0.0, float("-inf")).to(dtype)
    else:
        bias = attn_mask.to(dtype)
    return bias.expand(target)


def _broadcasts_to(shape, target: tuple) -> bool:
    """Whether `shape` broadcasts to exactly `target` (torch.broadcast_shapes costs ~50 us)."""
    if len(shape) > len(target):
        return False
    return all(size == 1 or size == want for size, want in zip(reversed(shape), reversed(target)))


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(N, L, E) -> (1, N, L, E); (..., H, L, E) -> (prod(...), H, L, E); last dim stride 1."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    rank = t.dim()
    if rank == 4:  # the usual case: no reshape (a decode step feels every op)
        return t
    if rank == 3:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])


# ----------------------------------------------------------------------------- public functions


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fused attention, a drop-in for torch.nn.functional.scaled_dot_product_attention.

    Arguments:
        query: (B, H, L, E) (or (N, L, E), or (..., H, L, E)); float32, float16, bfloat16
            (float64 runs the reference). Any strides with the last dim contiguous are read in
            place (q, k, v sliced from one fused qkv projection need no copy).
        key, value: (B, Hkv, S, E), the dtype and device of query; Hkv = H unless enable_gqa,
            then H % Hkv == 0 and query head h reads kv head h // (H / Hkv).
        attn_mask: None, bool (True takes part) or float (added to the scores), broadcastable to
            (B, H, L, S); a key-padding mask (B, 1, 1, S) is never expanded in memory.
        dropout_p: > 0 hands the call to torch (dropout is not fused).
        is_causal: query i attends keys j <= i (torch's top-left convention, also for L != S).
            Unlike torch, may be combined with attn_mask (both apply).
        scale: the score multiplier; 1 / sqrt(E) when None.
        enable_gqa: allow Hkv < H (grouped-query attention).
        rotary: (cos, sin), each (L, R/2), R <= E: apply_rotary_emb (non-interleaved) to query
            and key inside the kernel first. Requires L == S. Tables that require grad are
            applied outside the kernel so that they get their gradient.
    Returns:
        (B, H, L, E) in query's dtype (the shape of query). A row with no key to attend (all
        masked) is 0, with zero gradients, where torch may give NaN.
    """
    if rotary is None and not dropout_p:
        out = _lean_cpu_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    _check_qkv(query, key, value, "(B, H, L, E)", "(B, Hkv, S, E)", range(3, 9))
    if key.dim() != query.dim():
        raise ValueError(
            f"key: expected the rank of query ({query.dim()}: (B, Hkv, S, E)), got {_checks.shape_of(key)}"
        )
    head_dim, length, keys = query.shape[-1], query.shape[-2], key.shape[-2]
    if key.shape[:-3] != query.shape[:-3]:
        raise ValueError(
            f"key: expected the batch dims of query {tuple(query.shape[:-3])} before (Hkv, S, E), "
            f"got {_checks.shape_of(key)}"
        )
    if key.shape[-1] != head_dim:
        raise ValueError(f"key: expected (B, Hkv, S, E) with E = {head_dim} like query, got {_checks.shape_of(key)}")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(
            f"value: expected (B, Hkv, S, Ev) with the (B, Hkv, S) of key {tuple(key.shape[:-1])}, "
            f"got {_checks.shape_of(value)}"
        )
    _check_heads(query, key, bool(enable_gqa), "(B, Hkv, S, E)")
    scale = _check_scale(scale, head_dim)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {dropout_p!r}")
    target = (*query.shape[:-2], length, keys)
    if attn_mask is not None:
        bias_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        bias = _mask_to_bias(attn_mask, target, query.device, bias_dtype)
    if rotary is not None:
        _check_rotary(rotary, length, head_dim, query.device, "L")
        if keys != length:
            raise ValueError(f"rotary: requires L == S (one table row per query and key), got L = {length}, S = {keys}")
        cos, sin = rotary
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            # Learnable tables: rotate outside the kernel so the tables get their gradient.
            query, key = apply_rotary_emb(query, cos, sin), apply_rotary_emb(key, cos, sin)
            rotary = None

    mask_needs_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    if dropout_p > 0 or value.shape[-1] != head_dim or head_dim > MAX_HEAD_DIM or mask_needs_grad:
        return _torch_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa, rotary)

    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    bias4 = None if attn_mask is None else _as_4d_bias(bias, q4.shape[:2])
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary
    out = _dense_attention(q4, k4, v4, bias4, scale, bool(is_causal), cos, sin)
    return out if out.dim() == query.dim() else out.view(query.shape)


_LEAN_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _lean_cpu_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """The output of the common eager inference call on the CPU (a decode step: no gradient, not
    compiling, plain 4-D tensors, no mask or a bool / float one), straight to the C++ launcher;
    None for any other call, which then takes the full path (its checks raise the errors).

    Why: validation, the bool mask -> float bias conversion, the custom op and the lse cost ~20 us
    a call, twice torch's whole SDPA on a decode step over a short cache. Every condition below is
    one that the full path would accept and send to the "cpp" backend with the same result; the
    call is counted in _dispatch.calls as ("attention", "cpp") as the full path counts it.
    """
    if torch.compiler.is_compiling():  # first: nothing below (data_ptr()) may be traced
        return None
    if not (
        type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
        and query.is_cpu and key.is_cpu and value.is_cpu
    ):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    dtype = query.dtype
    if dtype not in _LEAN_DTYPES or key.dtype is not dtype or value.dtype is not dtype:
        return None
    q_shape, k_shape = query.shape, key.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or value.shape != k_shape:
        return None
    batch, heads, length, head_dim = q_shape
    kv_batch, kv_heads, keys, kv_dim = k_shape
    if (
        kv_batch != batch or kv_dim != head_dim or not 0 < head_dim <= MAX_HEAD_DIM
        or not (batch and heads and length and keys and kv_heads)
        or (kv_heads != heads and not (enable_gqa and heads % kv_heads == 0))
    ):
        return None
    q_strides, k_strides, v_strides = query.stride(), key.stride(), value.stride()
    if q_strides[3] != 1 or k_strides[3] != 1 or v_strides[3] != 1:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif type(scale) is not float and type(scale) is not int:
        return None
    bias_ptr = mask_ptr = 0
    bias_strides = (0, 0, 0, 0)
    if attn_mask is not None:
        if type(attn_mask) is not torch.Tensor or not attn_mask.is_cpu:
            return None
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return None
        mask_dtype = attn_mask.dtype
        if mask_dtype is not torch.bool and mask_dtype is not torch.float32:
            return None  # other masks are converted (or refused) on the full path
        bias_strides = _broadcast_strides(attn_mask.shape, attn_mask.stride(), batch, heads, length, keys)
        if bias_strides is None:
            return None
        if mask_dtype is torch.bool:
            mask_ptr = attn_mask.data_ptr()
        else:
            bias_ptr = attn_mask.data_ptr()
    if _lean_backend(dtype) != "cpp":
        return None
    _dispatch.calls[("attention", "cpp")] += 1
    return _native().forward_inference(
        query, key, value, (batch, heads, kv_heads, length, keys, head_dim),
        (q_strides[:3], k_strides[:3], v_strides[:3]), float(scale), bool(is_causal), bias_ptr,
        mask_ptr, bias_strides)


def _broadcast_strides(shape, strides, batch: int, heads: int, length: int, keys: int):
    """The element strides over (B, H, L, S) of a mask of `shape` broadcast to it (0 where it
    broadcasts), or None when it does not broadcast. Unrolled for the usual 4-D mask."""
    if len(shape) == 4:
        mb, mh, ml, ms = shape
        if not ((mb == 1 or mb == batch) and (mh == 1 or mh == heads) and (ml == 1 or ml == length)
                and (ms == 1 or ms == keys)):
            return None
        sb, sh, sl, ss = strides
        return (0 if mb == 1 else sb, 0 if mh == 1 else sh, 0 if ml == 1 else sl, 0 if ms == 1 else ss)
    if not _broadcasts_to(shape, (batch, heads, length, keys)):
        return None
    return (0,) * (4 - len(shape)) + tuple(0 if size == 1 else stride for size, stride in zip(shape, strides))


def _lean_backend(dtype: torch.dtype) -> str:
    """The backend _dispatch would choose for the attention of CPU tensors of `dtype`, without
    counting the call (the lean path counts it only when it runs it)."""
    forced = os.environ.get("VLMFAST_BACKEND")
    # TRITON_INTERPRET matters only to a forced Triton (one more environment read, ~1 us, saved).
    interpret = os.environ.get("TRITON_INTERPRET") if forced and "triton" in forced.lower() else None
    return _cached_choice(dtype, forced, interpret)


@functools.cache
def _cached_choice(dtype: torch.dtype, forced: str | None, interpret: str | None) -> str:
    # The environment is part of the key: the choice follows VLMFAST_BACKEND as select() does.
    return _dispatch._choose("cpu", dtype, _ORDER)


def _dense_attention(q, k, v, bias, scale: float, is_causal: bool, cos, sin) -> torch.Tensor:
    """The output of the dense forward. An eager call with nothing to differentiate runs the
    backend directly: the custom op's dispatch and autograd wrapper cost ~15 us a call, several
    times the kernel of a decode step. Compiling and training go through the custom op."""
    if (
        not torch.compiler.is_compiling()
        and type(q) is torch.Tensor  # not a fake / functional / other subclass: those trace
        and q.device.type in _EAGER_DEVICES
        and not (torch.is_grad_enabled() and _any_requires_grad(q, k, v, cos, sin))
    ):
        return _dense_forward(_backend("attention", q), q, k, v, bias, scale, is_causal, cos, sin)[0]
    return attention_fwd(q, k, v, bias, scale, is_causal, cos, sin)[0]


_EAGER_DEVICES = ("cpu", "cuda")  # not meta / fake tensors: those need the op's fake impl


def _any_requires_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _as_4d_bias(bias: torch.Tensor, batch_heads) -> torch.Tensor:
    """The (..., L, S) expanded bias as (B, H, L, S) matching _as_4d of the query."""
    if bias.dim() == 3:
        return bias.unsqueeze(0)
    if bias.dim() == 4:
        return bias
    return bias.reshape(*batch_heads, *bias.shape[-2:])


def _torch_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary):
    """What the kernels do not cover (dropout, a value head dim != E, E > 256, a mask that needs
    a gradient) runs in torch, rotary applied first."""
    if rotary is not None:
        query, key = apply_rotary_emb(query, *rotary), apply_rotary_emb(key, *rotary)
    if is_causal and attn_mask is not None:
        # torch refuses both together; fold the causal mask into the given one.
        length, keys = query.shape[-2], key.shape[-2]
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, dim=-3), value.repeat_interleave(group, dim=-3)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention over packed sequences, each attending only to itself (no padding).

    Arguments:
        q: (T, H, E), the tokens of n sequences one after another; float32/float16/bfloat16.
        k, v: (T, Hkv, E), H % Hkv == 0 (query head h reads kv head h // (H / Hkv)).
        cu_seqlens: int32 (n + 1,), cumulative lengths: 0, len0, len0 + len1, ..., T.
        max_seqlen: the longest sequence (sizes the kernel grid).
        is_causal: token i of a sequence attends its tokens j <= i.
        scale: the score multiplier; 1 / sqrt(E) when None.
        rotary: (cos, sin), each (T, R/2): one table row per packed token, applied to q and k.
    Returns:
        (T, H, E): equal to scaled_dot_product_attention on each sequence alone.
    """
    _check_qkv(q, k, v, "(T, H, E)", "(T, Hkv, E)", 3, names=("q", "k", "v"))
    total, heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[-1] != head_dim:
        raise ValueError(f"k: expected (T, Hkv, E) = ({total}, Hkv, {head_dim}) like q, got {_checks.shape_of(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected (T, Hkv, E) = {tuple(k.shape)} like k, got {_checks.shape_of(v)}")
    _check_heads(q, k, True, "(T, Hkv, E)", head_dim_index=1, key_name="k")
    scale = _check_scale(scale, head_dim)
    _checks.tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens: expected an int32 (n + 1,) tensor of cumulative lengths, got {cu_seqlens.dtype}")
    _checks.rank("cu_seqlens", cu_seqlens, 1, "int32 (n + 1,) cumulative lengths")
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens: expected int32 (n + 1,) cumulative lengths starting at 0, got an empty tensor")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected a tensor on {q.device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen: expected a non-negative int, got {max_seqlen!r}")
    if not torch.compiler.is_compiling():
        _check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    cos = sin = None
    if rotary is not None:
        _check_rotary(rotary, total, head_dim, q.device, "T")
        cos, sin = rotary
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            q, k = apply_rotary_emb(q, cos, sin, seq_dim=0), apply_rotary_emb(k, cos, sin, seq_dim=0)
            cos = sin = None
    if head_dim > MAX_HEAD_DIM:
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, is_causal, scale,
                                           None if cos is None else (cos, sin))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, bool(is_causal), cos, sin)
    return out


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The value checks (they read the tensor, so they are skipped while compiling)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected cumulative lengths starting at 0, got {bounds[0]} first")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens: expected non-decreasing cumulative lengths, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens: expected the last entry to be T = q.shape[0] = {total}, got {bounds[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen: expected at least the longest sequence {max(lengths)}, got {max_seqlen}")
