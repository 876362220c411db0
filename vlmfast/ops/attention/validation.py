"""Argument checks of the attention ops, before any kernel runs: each error names the argument
and the expected shape. Also torch's broadcasting of the batch dims (query (H, L, E) with key
(B, H, S, E) is a valid SDPA call), resolved to the shapes the kernels take."""

import math

import torch

from vlmfast.ops import _checks


_FLOAT_DTYPES = frozenset(_checks.FLOAT_DTYPES)


def qkv(query, key, value, layout_q: str, layout_kv: str, ranks, names=("query", "key", "value")):
    """Floating tensors of the allowed ranks (a range), one dtype, one device."""
    try:  # the valid call, in a few attribute reads (a small call feels every microsecond)
        dtype = query.dtype
        if (dtype in _FLOAT_DTYPES and key.dtype is dtype and value.dtype is dtype
                and query.dim() in ranks and key.dim() in ranks and value.dim() in ranks
                and ((query.is_cpu and key.is_cpu and value.is_cpu)
                     or query.device == key.device == value.device)):
            return
    except (AttributeError, TypeError):
        pass  # not tensors: the checks below name the argument
    q_name, k_name, v_name = names
    for name, t, layout in ((q_name, query, layout_q), (k_name, key, layout_kv), (v_name, value, layout_kv)):
        _checks.floating(name, t)
        _checks.rank(name, t, ranks, layout)
    for name, t in ((k_name, key), (v_name, value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: expected the dtype of {q_name} ({query.dtype}), got {t.dtype}")
    _checks.same_device(**{q_name: query, k_name: key, v_name: value})


def heads(query, key, enable_gqa: bool, kv_layout: str, head_dim_index: int = -3, key_name="key"):
    """H and Hkv (dim `head_dim_index` of query and key): equal, or Hkv dividing H with GQA."""
    q_heads, kv_heads = query.shape[head_dim_index], key.shape[head_dim_index]
    if enable_gqa:
        if kv_heads == 0 or q_heads % kv_heads:
            raise ValueError(
                f"{key_name}: expected {kv_layout} with a number of heads Hkv dividing H = {q_heads} "
                f"(grouped-query attention), got {_checks.shape_of(key)}"
            )
    elif kv_heads != q_heads:
        raise ValueError(
            f"key: expected H = {q_heads} heads like query (pass enable_gqa=True for grouped-query "
            f"attention), got {_checks.shape_of(key)}"
        )


def broadcast_shapes(query, key, value, enable_gqa: bool):
    """The shapes torch's SDPA broadcasts query, key and value to, or None when their batch dims
    already agree (the usual call: nothing to do).

    Without GQA every dim before (L, E) / (S, E) broadcasts, heads included; with GQA and
    Hkv != H the heads stay apart (H % Hkv == 0) and the dims before them broadcast."""
    q, k, v = query.shape, key.shape, value.shape
    if q[:-2] == k[:-2] and k[:-2] == v[:-2]:
        return None
    gqa = enable_gqa and q[-3] != k[-3]
    if gqa or (q[-3] != k[-3] and q[-3] != 1 and k[-3] != 1):
        heads(query, key, enable_gqa, "(B, Hkv, S, E)")  # raises unless a GQA group
    kept = 3 if gqa else 2  # trailing dims that do not broadcast
    if gqa and v[-3] != k[-3]:
        raise ValueError(f"value: expected Hkv = {k[-3]} heads like key, got {_checks.shape_of(value)}")
    batch = _broadcast(q[:-kept], (("key", key, k[:-kept]), ("value", value, v[:-kept])))
    return (*batch, *q[-kept:]), (*batch, *k[-kept:]), (*batch, *v[-kept:])


def _broadcast(query_batch: tuple, others) -> tuple:
    """query's batch dims broadcast with each other tensor's, right-aligned as torch does."""
    shape = list(query_batch)
    for name, tensor, batch in others:
        if len(batch) > len(shape):
            shape = [1] * (len(batch) - len(shape)) + shape
        for i, size in enumerate(batch, start=len(shape) - len(batch)):
            if size != shape[i] and size != 1 and shape[i] != 1:
                raise ValueError(
                    f"{name}: expected batch dims broadcastable with query's {tuple(query_batch)} "
                    f"before (S, E), got {_checks.shape_of(tensor)}"
                )
            shape[i] = max(shape[i], size) if size != 0 and shape[i] != 0 else 0
    return tuple(shape)


def rotary(tables, rows: int, head_dim: int, device, what: str):
    """tables = (cos, sin), each (rows, R/2) with R <= E."""
    if not isinstance(tables, (tuple, list)) or len(tables) != 2:
        raise TypeError(f"rotary: expected a (cos, sin) pair of ({what}, R/2) tensors, got {type(tables).__name__}")
    cos, sin = tables
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


def scale(value, head_dim: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"scale: expected a Python float or None, got {type(value).__name__}")
    return float(value)


def cu_seqlens(cu_seqlens, q, max_seqlen) -> None:
    """cu_seqlens: int32 (n + 1,) on q's device; max_seqlen a non-negative int."""
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


def cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The value checks (they read the tensor: skipped while compiling)."""
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
