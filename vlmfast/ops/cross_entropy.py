"""Fused linear + cross-entropy: the language-model head and its loss in one op, without the
(N, V) logits in memory.

Layers: public function (validates, flattens (B, L, D)) -> custom ops
`vlmfast::linear_cross_entropy_fwd` / `_bwd` (fake impls + autograd) -> backend launcher
(kernels/linear_cross_entropy.py for Triton, vlmfast/native/linear_cross_entropy.py for C++,
ops/reference.py otherwise).

Where the gradients are made. For reduction "mean" and "sum", when autograd will need them, the
forward computes the gradients already (Liger-Kernel's choice): each row's weight in the loss is
known before the backward (1 / #valid or 1), and the kernel forms softmax - onehot while the
logits are at hand, so the logits GEMM runs once instead of twice. They are held until the
backward, which only multiplies them by the incoming scalar gradient. For reduction "none" the
rows' weights come with the backward, so `_bwd` recomputes the logits block by block. Either
way, the memory is O(N D + V D) plus one block of logits.
"""

import torch

from vlmfast.ops import _checks, _dispatch, _lce_slices, reference, weight_updates

REDUCTIONS = ("mean", "sum", "none")

# ----------------------------------------------------------------------------- custom ops


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _rows_and_grads(op, hidden, weight, bias, labels, ignore_index, label_smoothing, row_scale):
    """(loss_rows, lse, grad_hidden, grad_weight, grad_bias) from the chosen backend; the
    gradients (of sum_i row_scale_i loss_i) are None without row_scale."""
    backend = _dispatch.select("linear_cross_entropy", hidden.device, hidden.dtype)
    if backend == "triton":
        from vlmfast.kernels import linear_cross_entropy as triton_lce

        return triton_lce.forward(hidden, weight, bias, labels, ignore_index, label_smoothing, row_scale)
    if backend == "cpp" and hidden.shape[0] > 0:
        from vlmfast.native import linear_cross_entropy as native_lce

        return native_lce.forward(hidden, weight, bias, labels, ignore_index, label_smoothing, row_scale)
    _dispatch.record(op, "reference")
    loss_rows, lse = reference.lce_rows(hidden, weight, bias, labels, ignore_index, label_smoothing)
    grads = (None, None, None)
    if row_scale is not None:
        grad_hidden, grad_weight, grad_bias = reference.lce_grads(
            hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing
        )
        grads = (grad_hidden, grad_weight, grad_bias if bias is not None else None)
    return (loss_rows, lse, *grads)


def _row_weights(labels, ignore_index: int, vocab: int, reduction: str, dtype) -> torch.Tensor:
    """Each row's weight in the reduced loss: 1 / #valid ("mean"; 0 valid rows: all 0) or 1."""
    valid = reference.lce_valid(labels, ignore_index, vocab).to(dtype)
    return valid / valid.sum().clamp(min=1) if reduction == "mean" else valid


@torch.library.custom_op("vlmfast::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, label_smoothing: float, reduction: str, with_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, grad_hidden, grad_weight, grad_bias).

    loss: float32 () for "mean" / "sum", (N,) for "none"; lse: float32 (N,). With `with_grads`
    (only for "mean" / "sum") the gradients of the loss: (N, D), (V, D) in the inputs' dtype and
    float32 (V,) (empty (0,) without a bias); without it all three are empty (0,).
    """
    dtype = _loss_dtype(hidden)
    row_scale = None
    if with_grads:
        row_scale = _row_weights(labels, ignore_index, weight.shape[0], reduction, dtype)
    loss_rows, lse, grad_hidden, grad_weight, grad_bias = _rows_and_grads(
        "linear_cross_entropy", hidden, weight, bias, labels, ignore_index, label_smoothing, row_scale
    )
    valid = reference.lce_valid(labels, ignore_index, weight.shape[0])
    loss = reference.lce_reduce(loss_rows.to(dtype), valid, reduction)
    empty = hidden.new_empty(0)
    if grad_bias is None:
        grad_bias = hidden.new_empty(0, dtype=dtype)
    return (loss, lse.to(dtype),
            grad_hidden if with_grads else empty, grad_weight if with_grads else empty.clone(),
            grad_bias.to(dtype) if with_grads else empty.new_empty(0, dtype=dtype))


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, with_grads):
    dtype = _loss_dtype(hidden)
    n, vocab = hidden.shape[0], weight.shape[0]
    loss = hidden.new_empty(n if reduction == "none" else (), dtype=dtype)
    lse = hidden.new_empty(n, dtype=dtype)
    if not with_grads:
        return loss, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0, dtype=dtype)
    grad_bias = hidden.new_empty(vocab if bias is not None else 0, dtype=dtype)
    return loss, lse, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


@torch.library.custom_op("vlmfast::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    row_scale: torch.Tensor, ignore_index: int, label_smoothing: float, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden (N, D), grad_weight (V, D), grad_bias float32 (V,) or (0,) without a bias):
    the gradients of sum_i row_scale_i * loss_i, the logits recomputed block by block. `lse`:
    the forward's log-sum-exp, reused by the Triton backward (no second vocabulary sweep)."""
    if lse is not None and _dispatch.select("linear_cross_entropy", hidden.device, hidden.dtype) == "triton":
        from vlmfast.kernels import linear_cross_entropy as triton_lce

        grad_hidden, grad_weight, grad_bias = triton_lce.backward(hidden, weight, bias, labels, lse, row_scale,
                                                                  ignore_index, label_smoothing)
    else:
        _, _, grad_hidden, grad_weight, grad_bias = _rows_and_grads(
            "linear_cross_entropy_bwd", hidden, weight, bias, labels, ignore_index, label_smoothing,
            row_scale,
        )
    dtype = _loss_dtype(hidden)
    grad_bias = grad_bias.to(dtype) if grad_bias is not None else hidden.new_empty(0, dtype=dtype)
    return grad_hidden, grad_weight, grad_bias


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, lse=None):
    dtype = _loss_dtype(hidden)
    grad_bias = hidden.new_empty(weight.shape[0] if bias is not None else 0, dtype=dtype)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, with_grads = inputs
    _, lse, grad_hidden, grad_weight, grad_bias = output
    # the outputs after the loss are not differentiated: unmaterialised, their gradients stay
    # None instead of zero-filled tensors, (V, D) for grad_weight
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, reduction, with_grads, None if bias is None else bias.dtype)
    if with_grads:  # the forward made the gradients: keep them, not the inputs
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, None, None, None, None)
    else:
        ctx.save_for_backward(None, None, None, hidden, weight, bias, labels, lse)


def _backward(ctx, grad_loss, _grad_lse, _gh, _gw, _gb):
    if grad_loss is None:  # unmaterialised: the loss took no part in what is differentiated
        return None, None, None, None, None, None, None, None
    ignore_index, label_smoothing, reduction, with_grads, bias_dtype = ctx.options
    grad_hidden, grad_weight, grad_bias, hidden, weight, bias, labels, *lse = ctx.saved_tensors
    if with_grads:
        # loss is a scalar here; its gradients scale linearly with the incoming one. The usual
        # incoming gradient is exactly 1 (loss.backward()): the saved gradients are then handed
        # on as they are, no (V, D) copy (the graph releases its hold on them after this node,
        # so the weight's AccumulateGrad can adopt the buffer). The check reads one scalar, so
        # it is made on plain eager tensors only (traced ones, fake or functional, scale; and
        # under CUDA-graph capture, where reading it back would sync).
        traced = (torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor
                  or (grad_loss.is_cuda and torch.cuda.is_current_stream_capturing()))
        if traced or not bool(grad_loss == 1):
            g = grad_loss.to(torch.float32)
            grad_hidden = (grad_hidden.float() * g).to(grad_hidden.dtype)
            grad_weight = (grad_weight.float() * g).to(grad_weight.dtype)
            grad_bias = grad_bias * g.to(grad_bias.dtype)
    else:
        dtype = _loss_dtype(hidden)
        row_scale = _row_weights(labels, ignore_index, weight.shape[0], reduction, dtype)
        row_scale = row_scale * grad_loss.to(dtype)  # (N,) for "none", a scalar otherwise
        grad_hidden, grad_weight, grad_bias = linear_cross_entropy_bwd(
            hidden, weight, bias, labels, row_scale.contiguous(), ignore_index, label_smoothing, lse[0]
        )
    grad_bias_out = grad_bias.to(bias_dtype) if bias_dtype is not None else None
    return grad_hidden, grad_weight, grad_bias_out, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


class _WeightUpdatedInSlices(torch.autograd.Function):
    """linear_cross_entropy (gradients recomputed in the backward) whose weight's optimizer
    takes the weight gradient in vocabulary slices (vlmfast.ops.weight_updates): the backward
    hands them over and returns no weight gradient. If the optimizer declines this time, the
    backward is the usual one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction):
        loss, lse = linear_cross_entropy_fwd(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                             reduction, False)[:2]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, label_smoothing, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, label_smoothing, reduction = ctx.options
        dtype = _loss_dtype(hidden)
        row_scale = _row_weights(labels, ignore_index, weight.shape[0], reduction, dtype) * grad_loss.to(dtype)
        update = weight_updates.begin_update(weight)
        if update is None:
            grad_hidden, grad_weight, grad_bias = linear_cross_entropy_bwd(
                hidden, weight, bias, labels, row_scale.contiguous(), ignore_index, label_smoothing, lse
            )
        else:
            grad_weight = None
            grad_hidden, grad_bias = _lce_slices.backward(hidden, weight, bias, labels, lse, row_scale,
                                                          ignore_index, label_smoothing, update)
        grad_bias = grad_bias.to(bias.dtype) if bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None

# ----------------------------------------------------------------------------- public function


def _validate(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap) -> None:
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    _checks.tensor("labels", labels)
    _checks.rank("hidden", hidden, (2, 3), "(N, D) or (B, L, D)")
    feature = hidden.shape[-1]
    _checks.rank("weight", weight, 2, f"(V, D) = (V, {feature}) as nn.Linear's weight")
    if weight.shape[1] != feature:
        raise ValueError(
            f"weight: expected (V, D) with D = hidden.shape[-1] = {feature}, got {_checks.shape_of(weight)}"
        )
    if weight.shape[0] == 0 or feature == 0:
        raise ValueError(f"weight: expected (V, D) with V >= 1 and D >= 1, got {_checks.shape_of(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels: expected an int64 tensor of class indices, got {labels.dtype}")
    rows = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != rows:
        layout = "(N,)" if hidden.dim() == 2 else "(B, L)"
        raise ValueError(f"labels: expected {layout} = {rows} (hidden's leading dims), got {_checks.shape_of(labels)}")
    if bias is not None:
        _checks.floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected (V,) = ({weight.shape[0]},), got {_checks.shape_of(bias)}")
    _checks.same_device(hidden=hidden, weight=weight, labels=labels, **({"bias": bias} if bias is not None else {}))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap: expected None or a positive float, got {softcap!r}")
    # One cheap reduction (it is skipped under torch.compile, where it would break the graph, and
    # under CUDA-graph capture, where reading the answer back would sync; the kernels then treat
    # an out-of-range label like ignore_index instead of reading out of bounds).
    capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and labels.numel():
        vocab = weight.shape[0]
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        if bad.numel():
            raise ValueError(
                f"labels: expected class indices in [0, V) = [0, {vocab}) or ignore_index = "
                f"{ignore_index}, got {bad[0].item()}"
            )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    grads_in_forward: bool = True,
    weight_used_once: bool = False,
) -> torch.Tensor:
    """Cross-entropy of a linear layer's logits, without the (N, V) logits in memory.

    Equals `F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=...,
    reduction=..., label_smoothing=...)`, computed in float32 over vocabulary blocks with an
    online log-sum-exp, with one deliberate difference: "mean" over zero non-ignored labels
    returns 0 with zero gradients (torch returns NaN).

    Arguments:
        hidden: (N, D) or (B, L, D) (flattened to N = B * L rows); float32, float16 or bfloat16
            (float64 runs the reference).
        weight: (V, D), the lm_head's weight as nn.Linear holds it (tied to the embedding or
            not), of hidden's dtype.
        labels: int64 (N,) or (B, L): class indices in [0, V), or ignore_index.
        bias: (V,) or None.
        ignore_index: rows with this label add nothing to the loss nor to the count of "mean".
        reduction: "mean" (over non-ignored rows), "sum", or "none" (per-row losses, 0 on
            ignored rows, shaped like labels).
        label_smoothing: eps in [0, 1]: the target is (1 - eps) onehot + eps / V, as torch's.
        softcap: logits -> softcap * tanh(logits / softcap) first (Gemma-2 style). Not fused:
            it runs the materialised reference (same answer, O(N V) memory).
        grads_in_forward: for "mean" / "sum", form the gradients in the forward (one logits GEMM,
            the default) or recompute the logits in the backward (False: one more GEMM, but the
            (V, D) weight gradient does not exist between the forward and the backward, which
            lowers a training step's peak when the head's rows are few).
        weight_used_once: the caller's promise that this op is weight's only use in the graph
            (an untied head). Then, if weight's optimizer steps inside the backward and takes
            slices (vlmfast.train.AdamWInBackward registers itself in vlmfast.ops.weight_updates),
            the backward hands it the weight gradient in vocabulary slices as they are made and
            weight.grad is never formed: the (V, D) gradient is never in memory whole. Without
            such an optimizer it changes nothing. Do not set it for a tied head: the embedding's
            share of the gradient would come after the weight was already updated.
    Returns:
        float32 loss, () for "mean" / "sum", labels' shape for "none". Differentiable in hidden,
        weight and bias (gradients in their dtypes).
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if softcap is not None:
        loss = reference.linear_cross_entropy(flat_hidden, weight, flat_labels, bias, ignore_index,
                                              reduction, float(label_smoothing), float(softcap))
        return loss.reshape(labels.shape) if reduction == "none" else loss
    wants_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if weight_updates.sliced(weight, weight_used_once):
        loss = _WeightUpdatedInSlices.apply(flat_hidden, weight, bias, flat_labels, int(ignore_index),
                                            float(label_smoothing), reduction)
    else:
        with_grads = reduction != "none" and torch.is_grad_enabled() and wants_grad and bool(grads_in_forward)
        loss = linear_cross_entropy_fwd(flat_hidden, weight, bias, flat_labels, int(ignore_index),
                                        float(label_smoothing), reduction, with_grads)[0]
    return loss.reshape(labels.shape) if reduction == "none" else loss
