"""Rotary position embeddings: apply_rotary_emb (1D or 2D tables, half or interleaved pairs) and
rope_2d (Qwen2-VL's vision tables for (row, col) patch positions).

Layers: public function (validates) -> custom op `vlmfast::rotary_fwd` / `vlmfast::rotary_bwd`
(fake impl + autograd) -> backend launcher (kernels/rotary.py for Triton, vlmfast/native/rotary.py
for C++ and CUDA, ops/reference.py otherwise).
"""

import torch

from vlmfast.ops import _checks, _dispatch, _eager, reference

# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("vlmfast::rotary_fwd", mutates_args=())
def rotary_fwd(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, conjugate: bool,
    seq_dim: int,
) -> torch.Tensor:
    """x rotated by the table angles; by their negatives with `conjugate` (the x-gradient)."""
    return _rotate(x, cos, sin, interleaved, conjugate, seq_dim)


def _rotate(x, cos, sin, interleaved: bool, conjugate: bool, seq_dim: int) -> torch.Tensor:
    """rotary_fwd's body (also run directly by plain inference calls, ops/_eager.py)."""
    backend = _dispatch.select("rotary", x.device, x.dtype)
    if x.numel() == 0:
        return x.clone()
    if backend == "triton":
        from vlmfast.kernels import rotary as triton_rotary

        return triton_rotary.forward(x, cos, sin, interleaved, conjugate, seq_dim)
    if backend in ("cpp", "cuda"):
        from vlmfast.native import rotary as native_rotary

        return native_rotary.forward(x, cos, sin, interleaved, conjugate, seq_dim)
    _dispatch.record("rotary", "reference")
    return reference.apply_rotary_emb(x, cos, -sin if conjugate else sin, interleaved, seq_dim)


@rotary_fwd.register_fake
def _(x, cos, sin, interleaved, conjugate, seq_dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("vlmfast::rotary_bwd", mutates_args=())
def rotary_bwd(
    grad: torch.Tensor, x: torch.Tensor, half: int, interleaved: bool, seq_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the (L, half) cos and sin tables, float32 (float64 for float64 input)."""
    backend = _dispatch.select("rotary", x.device, x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[seq_dim], half, dtype=_table_grad_dtype(x), device=x.device)
        return zeros, zeros.clone()
    if backend == "triton":
        from vlmfast.kernels import rotary as triton_rotary

        return triton_rotary.table_backward(grad, x, half, interleaved, seq_dim)
    if backend in ("cpp", "cuda"):
        from vlmfast.native import rotary as native_rotary

        return native_rotary.table_backward(grad, x, half, interleaved, seq_dim)
    _dispatch.record("rotary_bwd", "reference")
    return reference.rotary_table_grads(grad, x, half, interleaved, seq_dim)


def _table_grad_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@rotary_bwd.register_fake
def _(grad, x, half, interleaved, seq_dim):
    table = x.new_empty(x.shape[seq_dim], half, dtype=_table_grad_dtype(x))
    return table, torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    x, cos, sin, interleaved, conjugate, seq_dim = inputs
    needs_tables = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, x if needs_tables else None)
    ctx.options = (interleaved, conjugate, seq_dim)


def _backward(ctx, grad):
    cos, sin, x = ctx.saved_tensors
    interleaved, conjugate, seq_dim = ctx.options
    # The rotation is orthogonal: its transpose is the rotation by the negated angle.
    grad_x = rotary_fwd(grad.contiguous(), cos, sin, interleaved, not conjugate, seq_dim)
    grad_cos = grad_sin = None
    if x is not None:
        grad_cos, grad_sin = rotary_bwd(grad.contiguous(), x, cos.shape[-1], interleaved, seq_dim)
        if conjugate:
            grad_sin = -grad_sin
        grad_cos, grad_sin = grad_cos.to(cos.dtype), grad_sin.to(sin.dtype)
    return grad_x, grad_cos, grad_sin, None, None, None


rotary_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vlmfast::rope_2d_fwd", mutates_args=())
def rope_2d_fwd(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) tables (N, head_dim / 2) for integer (N, 2) positions."""
    return _rope_2d_tables(positions, head_dim, theta)


def _rope_2d_tables(positions, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_2d_fwd's body (also run directly by plain eager calls, ops/_eager.py)."""
    backend = _dispatch.select("rope_2d", positions.device, torch.float32)
    if positions.shape[0] == 0:
        empty = positions.new_empty(0, head_dim // 2, dtype=torch.float32)
        return empty, empty.clone()
    inv_freq = reference.rope_2d_inv_freq(head_dim, theta, positions.device)
    if backend == "triton":
        from vlmfast.kernels import rotary as triton_rotary

        return triton_rotary.rope_2d(positions, inv_freq)
    if backend in ("cpp", "cuda"):
        from vlmfast.native import rotary as native_rotary

        return native_rotary.rope_2d(positions, inv_freq)
    _dispatch.record("rope_2d", "reference")
    return reference.rope_2d(positions, head_dim, theta)


@rope_2d_fwd.register_fake
def _(positions, head_dim, theta):
    table = positions.new_empty(positions.shape[0], head_dim // 2, dtype=torch.float32)
    return table, torch.empty_like(table)


# ----------------------------------------------------------------------------- public functions


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    seq_dim: int = -2,
) -> torch.Tensor:
    """Rotary position embedding of x.

    Arguments:
        x: (..., L, ..., E), the sequence at `seq_dim` and the head dim E last; float32,
            float16, bfloat16 (float64 runs the reference).
        cos, sin: (L, R/2) with R <= E even, broadcast over every other dim of x. Use float32
            tables: they are read in float32 by every kernel.
        interleaved: pairs (2i, 2i+1) (GPT-J style) instead of (i, i + R/2) ("rotate half",
            GPT-NeoX / Llama / Qwen2-VL style).
        seq_dim: the dim of x that indexes the table rows; not the last dim.
    Returns:
        (same shape as x), x's dtype: out_a = x_a cos - x_b sin, out_b = x_b cos + x_a sin on the
        first R dims, the dims from R on unchanged. Differentiable in x, and in cos and sin when
        they require grad (learnable frequencies).
    """
    _checks.floating("x", x)
    _checks.floating("cos", cos)
    _checks.floating("sin", sin)
    if x.dim() < 2:
        raise ValueError(f"x: expected (..., L, ..., E) with at least 2 dims, got {_checks.shape_of(x)}")
    if not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim: expected an int in [{-x.dim()}, {x.dim() - 1}], got {seq_dim!r}")
    seq_dim %= x.dim()
    if seq_dim == x.dim() - 1:
        raise ValueError("seq_dim: the last dim of x is the head dim E; the sequence must be another dim")
    length, head_dim = x.shape[seq_dim], x.shape[-1]
    _checks.rank("cos", cos, 2, f"(L, R/2) = ({length}, R/2)")
    _checks.rank("sin", sin, 2, f"(L, R/2) = ({length}, R/2)")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {_checks.shape_of(cos)}, got {_checks.shape_of(sin)}")
    if cos.shape[0] != length:
        raise ValueError(
            f"cos: expected (L, R/2) with L = x.shape[{seq_dim}] = {length}, got {_checks.shape_of(cos)}"
        )
    if cos.shape[1] < 1 or 2 * cos.shape[1] > head_dim:
        raise ValueError(
            f"cos: expected (L, R/2) with 1 <= R/2 <= E/2 = {head_dim // 2} (one entry per rotated "
            f"pair; tables of width R that repeat the half are not accepted), got {_checks.shape_of(cos)}"
        )
    _checks.same_device(x=x, cos=cos, sin=sin)
    if _eager.plain_inference(x, cos, sin):
        return _rotate(x, cos, sin, bool(interleaved), False, seq_dim)
    return rotary_fwd(x, cos, sin, bool(interleaved), False, seq_dim)


def rope_2d(
    positions: torch.Tensor, head_dim: int, *, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of 2D rotary embedding for patch positions (Qwen2-VL's vision rotary).

    Arguments:
        positions: integer (N, 2), the (row, col) of each patch.
        head_dim: the attention head dim E; a multiple of 4 (a quarter of it rotates by the row,
            a quarter by the column, in "rotate half" pairs).
        theta: the frequency base.
    Returns:
        (cos, sin), float32 (N, head_dim / 2), for `apply_rotary_emb(x, cos, sin)`:
        inv_freq = theta ** (-arange(0, head_dim/2, 2) / (head_dim/2)),
        angles = [row * inv_freq, col * inv_freq].
    """
    _checks.integer("positions", positions)
    _checks.rank("positions", positions, 2, "(N, 2) integer (row, col)")
    if positions.shape[1] != 2:
        raise ValueError(f"positions: expected (N, 2) integer (row, col), got {_checks.shape_of(positions)}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 4:
        raise ValueError(f"head_dim: expected a positive multiple of 4 (rows and columns each rotate a quarter), got {head_dim!r}")
    if not float(theta) > 0:
        raise ValueError(f"theta: expected a positive frequency base, got {theta!r}")
    if _eager.plain_inference(positions):  # (integer positions: nothing to differentiate, ever)
        return _rope_2d_tables(positions, head_dim, float(theta))
    return rope_2d_fwd(positions, head_dim, float(theta))
