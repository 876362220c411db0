"""Contrastive losses: infonce_loss (CLIP / open_clip's ClipLoss) and siglip_loss (SigLIP /
open_clip's SigLipLoss), fused so that the B x B logits are never held in memory.

Layers: public function (validates; L2-normalises in float32 with autograd; all-gathers over a
process group) -> custom ops `vlmfast::infonce_fwd` / `_bwd`, `vlmfast::siglip_fwd` / `_bwd`
(fake impls + autograd) on normalised features -> backend launcher (kernels/contrastive.py for
Triton, vlmfast/native/contrastive.py for C++, ops/reference.py otherwise).
"""

import torch

from vlmfast.ops import _checks, _dispatch, _gather, reference

# ----------------------------------------------------------------------------- custom ops


def _loss_dtype(a: torch.Tensor) -> torch.dtype:
    """Losses and the scale / bias gradients are float32 (float64 for float64 features)."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32


@torch.library.custom_op("vlmfast::infonce_fwd", mutates_args=())
def infonce_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, row_lse, col_lse) for normalised features a, b (B, D) and a 0-dim scale: loss ()
    and the log-sum-exps of the rows and columns of scale * a @ b.T, (B,) each."""
    backend = _dispatch.select("infonce", a.device, a.dtype)
    if backend == "triton":
        from vlmfast.kernels import contrastive as triton_contrastive

        return triton_contrastive.infonce_forward(a, b, scale)
    if backend == "cpp":
        from vlmfast.native import contrastive as native_contrastive

        return native_contrastive.infonce_forward(a, b, float(scale))
    _dispatch.record("infonce", "reference")
    return reference.infonce_forward_stats(a, b, scale)


@infonce_fwd.register_fake
def _(a, b, scale):
    dtype = _loss_dtype(a)
    row = a.new_empty(a.shape[0], dtype=dtype)
    return a.new_empty((), dtype=dtype), row, torch.empty_like(row)


@torch.library.custom_op("vlmfast::infonce_bwd", mutates_args=())
def infonce_bwd(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
    col_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d a, d b, d scale) of grad * loss; d a, d b in the features' dtype, d scale float32 ()."""
    backend = _dispatch.select("infonce", a.device, a.dtype)
    if backend == "triton":
        from vlmfast.kernels import contrastive as triton_contrastive

        return triton_contrastive.infonce_backward(grad, a, b, scale, row_lse, col_lse)
    if backend == "cpp":
        from vlmfast.native import contrastive as native_contrastive

        return native_contrastive.infonce_backward(float(grad), a, b, float(scale), row_lse, col_lse)
    _dispatch.record("infonce_bwd", "reference")
    return reference.infonce_grads(grad, a, b, scale, row_lse, col_lse)


@infonce_bwd.register_fake
def _(grad, a, b, scale, row_lse, col_lse):
    return torch.empty_like(a), torch.empty_like(b), a.new_empty((), dtype=_loss_dtype(a))


def _infonce_setup(ctx, inputs, output):
    a, b, scale = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(a, b, scale, row_lse, col_lse)


def _infonce_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
    a, b, scale, row_lse, col_lse = ctx.saved_tensors
    grad_a, grad_b, grad_scale = infonce_bwd(grad_loss, a, b, scale, row_lse, col_lse)
    return grad_a, grad_b, grad_scale.to(scale.dtype)


infonce_fwd.register_autograd(_infonce_backward, setup_context=_infonce_setup)


@torch.library.custom_op("vlmfast::siglip_fwd", mutates_args=())
def siglip_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SigLIP loss () of normalised features a, b (B, D), a 0-dim scale and bias."""
    backend = _dispatch.select("siglip", a.device, a.dtype)
    if backend == "triton":
        from vlmfast.kernels import contrastive as triton_contrastive

        return triton_contrastive.siglip_forward(a, b, scale, bias)
    if backend == "cpp":
        from vlmfast.native import contrastive as native_contrastive

        return native_contrastive.siglip_forward(a, b, float(scale), float(bias))
    _dispatch.record("siglip", "reference")
    return reference.siglip_forward_loss(a, b, scale, bias)


@siglip_fwd.register_fake
def _(a, b, scale, bias):
    return a.new_empty((), dtype=_loss_dtype(a))


@torch.library.custom_op("vlmfast::siglip_bwd", mutates_args=())
def siglip_bwd(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d a, d b, d scale, d bias) of grad * loss; d scale and d bias float32 ()."""
    backend = _dispatch.select("siglip", a.device, a.dtype)
    if backend == "triton":
        from vlmfast.kernels import contrastive as triton_contrastive

        return triton_contrastive.siglip_backward(grad, a, b, scale, bias)
    if backend == "cpp":
        from vlmfast.native import contrastive as native_contrastive

        return native_contrastive.siglip_backward(float(grad), a, b, float(scale), float(bias))
    _dispatch.record("siglip_bwd", "reference")
    return reference.siglip_grads(grad, a, b, scale, bias)


@siglip_bwd.register_fake
def _(grad, a, b, scale, bias):
    scalar = a.new_empty((), dtype=_loss_dtype(a))
    return torch.empty_like(a), torch.empty_like(b), scalar, torch.empty_like(scalar)


def _siglip_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _siglip_backward(ctx, grad_loss):
    a, b, scale, bias = ctx.saved_tensors
    grad_a, grad_b, grad_scale, grad_bias = siglip_bwd(grad_loss, a, b, scale, bias)
    return grad_a, grad_b, grad_scale.to(scale.dtype), grad_bias.to(bias.dtype)


siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)

@torch.library.custom_op("vlmfast::siglip_fwd_bwd", mutates_args=())
def siglip_fwd_bwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d a, d b, d scale, d bias) of the SigLIP loss itself, from one pass over the logits:
    the C++ kernels only (see _gradient_in_forward)."""
    from vlmfast.native import contrastive as native_contrastive

    return native_contrastive.siglip_forward_backward(a, b, float(scale), float(bias))


@siglip_fwd_bwd.register_fake
def _(a, b, scale, bias):
    scalar = a.new_empty((), dtype=_loss_dtype(a))
    return scalar, torch.empty_like(a), torch.empty_like(b), torch.empty_like(scalar), torch.empty_like(scalar)


def _siglip_fwd_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype)


def _siglip_fwd_bwd_backward(ctx, grad_loss, *_grads_of_the_gradients):
    # The loss is a scalar, so its gradient for any upstream g is g times the one formed forward.
    grad_a, grad_b, grad_scale, grad_bias = ctx.saved_tensors
    scale_dtype, bias_dtype = ctx.dtypes
    return (grad_loss * grad_a, grad_loss * grad_b, (grad_loss * grad_scale).to(scale_dtype),
            (grad_loss * grad_bias).to(bias_dtype))


siglip_fwd_bwd.register_autograd(_siglip_fwd_bwd_backward, setup_context=_siglip_fwd_bwd_setup)


def _gradient_in_forward(a, b, scale, bias) -> bool:
    """Whether siglip_loss should form its gradient in the forward pass: when autograd will want
    it and the C++ kernels run. The tiles of the logits are then computed once for both (6 B^2 D
    flops instead of 8); the price is the backward's work in a forward whose loss is never
    differentiated (validation under grad mode: use torch.no_grad there). InfoNCE cannot do the
    same: its gradient needs the column log-sum-exps, known only after the whole pass. Under
    torch.compile the two-op path is kept (the backend choice is not traceable)."""
    if torch.compiler.is_compiling():
        return False
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, scale, bias))
    return wanted and _dispatch.select("siglip", a.device, a.dtype) == "cpp"


# ----------------------------------------------------------------------------- public functions


def _check_features(image_features, text_features) -> None:
    _checks.floating("image_features", image_features)
    _checks.floating("text_features", text_features)
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        _checks.rank(name, x, 2, "(B, D)")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name}: expected (B, D) with B >= 1 and D >= 1 (an empty batch has no loss), got {_checks.shape_of(x)}")
    if text_features.shape != image_features.shape:
        raise ValueError(
            f"text_features: expected (B, D) = {_checks.shape_of(image_features)} like image_features, "
            f"got {_checks.shape_of(text_features)}"
        )
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features: expected {image_features.dtype} like image_features, got {text_features.dtype}")


def _check_scalar(name: str, value, features: torch.Tensor) -> torch.Tensor:
    _checks.floating(name, value)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name}: expected a scalar tensor, shape () or (1,), got {_checks.shape_of(value)}")
    _checks.same_device(image_features=features, **{name: value})
    return value


def _prepare(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L2-normalised rows (computed in float32, F.normalize with eps 1e-12, autograd through it),
    returned in the features' dtype: the kernels read normalised features."""
    if not normalize:
        return features
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    return reference._unit_rows(features.to(compute)).to(features.dtype)


def _scalar(value: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The 0-dim scale / bias the custom ops take: float32 (float64 for float64 features)."""
    return value.reshape(()).to(_loss_dtype(features))


def infonce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    normalize: bool = True,
    group=None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (open_clip's ClipLoss), without the B x B logits in memory.

    Arguments:
        image_features, text_features: (B, D), float32, float16, bfloat16 (float64 runs the
            reference); row i of each is a matching pair.
        logit_scale: scalar tensor (shape () or (1,)), the multiplier, already exp'd.
        normalize: L2-normalise the rows first (F.normalize, eps 1e-12, in float32).
        group: a torch.distributed process group. Each rank passes its local (B, D) batch (the
            same B on every rank) and gets the loss of the global (world * B, D) batch, ranks in
            rank order. Rank r's features receive d/d(x_r) of (1/world) sum_k L_k, where L_k is
            the global loss as rank k computed it: with the same upstream gradient on every rank
            (every rank calls loss.backward()) that is exactly the global loss's gradient with
            respect to rank r's features. (open_clip's gather_with_grad gives world times that
            and relies on DDP's averaging to undo it: under DDP, scale this loss by world to get
            the same parameter gradients.)
    Returns:
        () in the features' dtype: with logits = logit_scale * n(img) @ n(txt).T,
        (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2. Differentiable in both feature
        tensors and logit_scale.
    """
    _check_features(image_features, text_features)
    _check_scalar("logit_scale", logit_scale, image_features)
    if group is not None:
        image_features, text_features = _gather.all_gather_with_grad(group, image_features, text_features)
    a, b = _prepare(image_features, normalize), _prepare(text_features, normalize)
    loss, _, _ = infonce_fwd(a, b, _scalar(logit_scale, a))
    return loss.to(image_features.dtype)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    normalize: bool = True,
    group=None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss), without the B x B logits in memory.

    Arguments:
        image_features, text_features: (B, D), float32, float16, bfloat16 (float64 runs the
            reference); row i of each is a matching pair.
        logit_scale: scalar tensor (shape () or (1,)), the multiplier, already exp'd.
        logit_bias: scalar tensor (shape () or (1,)), added to every logit.
        normalize: L2-normalise the rows first (F.normalize, eps 1e-12, in float32).
        group: a torch.distributed process group: the loss of the all-gathered global batch, with
            the gradient semantics of `infonce_loss` (B here is the global batch).
    Returns:
        () in the features' dtype: with logits = logit_scale * n(img) @ n(txt).T + logit_bias and
        labels = 2I - 1, -sum(logsigmoid(labels * logits)) / B. Differentiable in both feature
        tensors, logit_scale and logit_bias.
    """
    _check_features(image_features, text_features)
    _check_scalar("logit_scale", logit_scale, image_features)
    _check_scalar("logit_bias", logit_bias, image_features)
    if group is not None:
        image_features, text_features = _gather.all_gather_with_grad(group, image_features, text_features)
    a, b = _prepare(image_features, normalize), _prepare(text_features, normalize)
    scale, bias = _scalar(logit_scale, a), _scalar(logit_bias, a)
    if _gradient_in_forward(a, b, scale, bias):
        loss = siglip_fwd_bwd(a, b, scale, bias)[0]
    else:
        loss = siglip_fwd(a, b, scale, bias)
    return loss.to(image_features.dtype)
