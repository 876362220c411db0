"""Linear layer with a fused activation: y = act(x W^T + b), the models' qkv / proj / fc1 / fc2.

    y = linear(x, weight, bias, activation="quick_gelu")     # (..., K) -> (..., N)

Layers: public function (validates; routes what no kernel covers straight to PyTorch) -> custom
ops `vlmfast::linear_fwd` / `vlmfast::linear_bwd` (fake impls + autograd; eager inference calls on
plain tensors run linear_fwd's body directly, without the custom op's dispatch) -> backend:
  cpp:   csrc/cpu/gemm.cpp on the CPU with at least SMALL_M rows, float32, bfloat16 and float16
         (computed in float32): packed panels, micro-kernels picked at run time (AMX, AVX512-BF16,
         AVX-512, AVX2), blocking from the CPU's cache sizes, bias + activation in the GEMM's
         epilogue; the backward runs dx = dz W and dW = dz^T x through the same kernel (transposed
         strides) after dz = dy * act'(z) and db = sum dz in one vectorised pass
         (vlmfast/native/linear.py). Under CPU autocast the operands are rounded to the autocast
         dtype while they are packed (no cast copies) and gradients come back in each input's
         dtype. Where torch's own GEMM is faster for a shape class on this CPU (measured once per
         machine setting, ops/_linear_choice.py; the forward and the backward each their own
         class, the backward by the gradients it forms), the class goes to torch;
  anything else (CUDA: cuBLAS through torch; float64; fewer than SMALL_M rows, where packing W
  costs more than it saves): torch.nn.functional.linear + the activation, the reference
  (ops/reference.py).
"""

import contextlib
import contextvars

import torch

from vlmfast.ops import _checks, _dispatch, _eager, _linear_choice, reference

ACTIVATIONS = (None, "quick_gelu", "gelu_tanh", "gelu")
SMALL_M = 16  # below this many rows the weight's packing outweighs the GEMM's speed-up
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# whether inference calls keep a packed copy of their weight (packed_weight_cache)
_CACHING = contextvars.ContextVar("vlmfast_linear_caching", default=True)


@contextlib.contextmanager
def packed_weight_cache(enabled: bool):
    """Within the block, inference calls keep (True, the default) or do not keep (False) a packed
    copy of their weights: a model that must hold its weights once (a generative model's
    prompt, where the copy would double the resident weights) packs per call instead."""
    token = _CACHING.set(bool(enabled))
    try:
        yield
    finally:
        _CACHING.reset(token)


def _activation_name(activation: str) -> str | None:
    return None if activation == "none" else activation


def _torch_forward(x, weight, bias, act, compute, keep):
    """torch's own linear in the compute dtype (the casts autocast makes), then the activation."""
    def cast(t):  # (a no-op .to still costs a dispatch, ~2 us: small calls feel three)
        return t if t is None or t.dtype is compute else t.to(compute)

    z = torch.nn.functional.linear(cast(x), cast(weight), cast(bias))
    if act is None:
        return z, x.new_empty(0)
    return reference.LINEAR_ACTIVATIONS[act](z), z if keep else x.new_empty(0)


def _native_forward(x, weight, bias, act, compute, keep, cache, packed=None):
    from vlmfast.native import linear as native_linear

    if packed is None:
        packed = native_linear.packed_weight(weight, cache, compute, rows=x.shape[0])
    out, pre = native_linear.gemm(x, packed, bias, act, keep_pre=keep, out_dtype=compute)
    return out, pre if pre is not None else x.new_empty(0)


def _eligible(backend, x, weight, compute) -> bool:
    """Whether the C++ GEMM can run this call at all (then a measurement decides whether it does)."""
    return (backend == "cpp" and x.device.type == "cpu" and compute in KERNEL_DTYPES
            and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES
            and x.shape[0] >= SMALL_M and weight.shape[0] > 0 and weight.shape[1] > 0)


def _forward_work(cache: bool, keep: bool) -> str:
    """The forward's part of a shape class: "cached" (inference on a kept packed weight),
    "forward" (the weight packed per call: a prompt that keeps no copy, a frozen tower in a
    training step), "forward+pre" (a training forward that keeps the pre-activation)."""
    return "cached" if cache else "forward+pre" if keep else "forward"


def _backward_work(need_x: bool, need_weight: bool, need_bias: bool) -> str:
    """The backward's part of a shape class: which gradients it forms ("backward:x" for a frozen
    layer that only passes the gradient on, "backward:xwb" for a trained one with a bias...)."""
    return "backward:" + "x" * need_x + "w" * need_weight + "b" * need_bias


def _runs_kernel(backend, x, weight, bias, act, compute, cache, keep) -> bool:
    """Whether the C++ GEMM runs this forward (its class: the forward alone, as the call runs it)."""
    return _measured_faster(backend, x, weight, compute, _forward_work(cache, keep),
                            lambda native: _timed_forward(native, x, weight, bias, act, compute, cache, keep))


def _runs_backward_kernel(backend, x, weight, bias, act, compute, needs) -> bool:
    """Whether the C++ GEMM runs a backward forming the gradients `needs` (need_x, need_weight,
    need_bias): its own class, since a frozen layer's backward (dx alone) and a trained one's
    (three gradients) are different work, and so is a forward without a backward."""
    return _measured_faster(backend, x, weight, compute, _backward_work(*needs),
                            lambda native: _timed_backward(native, x, weight, bias, act, compute, needs))


def _measured_faster(backend, x, weight, compute, work: str, timed) -> bool:
    """Whether the C++ GEMM runs a call doing `work`: it can, and for the call's shape class it
    was measured faster than torch's linear on this machine (or the choice is forced).
    timed(native) gives the step one side's measurement times."""
    if not _eligible(backend, x, weight, compute):
        return False
    key = _linear_choice.shape_class(x.shape[0], weight.shape[0], weight.shape[1], x.dtype, weight.dtype,
                                     compute, work)
    return _linear_choice.choose(key, lambda: timed(True), lambda: timed(False)) == "vlmfast"


def _timed_forward(native, x, weight, bias, act, compute, cache, keep):
    """What the measurement times for one side's forward. With `cache`, ours on weight panels
    packed beforehand (the steady state of a reused weight; the copy is not kept); else ours
    packing per call, as the call will."""
    if not native:
        return lambda: _torch_forward(x, weight, bias, act, compute, keep)
    packed = None
    if cache:
        from vlmfast.native import linear as native_linear

        packed = native_linear.pack(weight, compute)
    return lambda: _native_forward(x, weight, bias, act, compute, keep, False, packed)


def _timed_backward(native, x, weight, bias, act, compute, needs):
    """What the measurement times for one side's backward: the gradients `needs` from a saved
    pre-activation (ours packing per call, as a step runs it)."""
    grad = torch.ones(x.shape[0], weight.shape[0], dtype=compute)  # (values do not change the time)
    pre = _torch_forward(x, weight, bias, None, compute, False)[0] if act is not None else x.new_empty(0)
    backward = _native_backward if native else _torch_backward
    return lambda: backward(grad, x, weight, bias, pre, act, *needs, compute)


def _native_backward(grad, x, weight, bias, pre, act, need_x, need_weight, need_bias, compute):
    """dz and db in one pass, then dx = dz W and dW = dz^T x through the C++ GEMM."""
    from vlmfast.native import linear as native_linear

    dz, db = native_linear.epilogue_backward(grad, pre, act, need_bias)
    # each GEMM's B unpacked or in the thread's reused packing buffer (dead once that GEMM returns)
    dx = native_linear.gemm(dz, native_linear.operand(weight.t(), compute, rows=dz.shape[0]),
                            out_dtype=x.dtype)[0] if need_x else None
    dw = native_linear.gemm(dz.t(), native_linear.operand(x.t(), compute, rows=dz.shape[1]),
                            out_dtype=weight.dtype)[0] if need_weight else None
    return dx, dw, db


def _torch_backward(grad, x, weight, bias, pre, act, need_x, need_weight, need_bias, compute):
    dz = grad if act is None else _grad_pre(grad, pre.to(compute), act)
    dx = (dz @ weight.to(compute)).to(x.dtype) if need_x else None
    dw = (dz.t() @ x.to(compute)).to(weight.dtype) if need_weight else None
    db = dz.sum(0, dtype=torch.float32) if need_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("vlmfast::linear_fwd", mutates_args=())
def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
    keep_pre: bool, cache_weight: bool, compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K), bias (N,) or None -> (act(x W^T + b) (M, N), pre), both in the
    `compute` dtype, every operand rounded to it first (autocast's casts). pre is the
    pre-activation x W^T + b (M, N) when keep_pre and an activation is set (the backward's
    input), else an empty (0,) tensor. cache_weight: the weight will not change under this call
    (no autograd on it), so its packed copy may be reused across calls."""
    act = _activation_name(activation)
    return _forward(x, weight, bias, act, keep_pre and act is not None, cache_weight, compute)


def _forward(x, weight, bias, act, keep, cache, compute):
    """linear_fwd's body: the C++ GEMM where it runs this call, else torch's linear."""
    backend = _dispatch.select("linear", x.device, compute)
    if _runs_kernel(backend, x, weight, bias, act, compute, cache, keep):
        return _native_forward(x, weight, bias, act, compute, keep, cache)
    _dispatch.record("linear", "reference")
    return _torch_forward(x, weight, bias, act, compute, keep)


@linear_fwd.register_fake
def _(x, weight, bias, activation, keep_pre, cache_weight, compute):
    out = x.new_empty(x.shape[0], weight.shape[0], dtype=compute)
    keep = keep_pre and _activation_name(activation) is not None
    return out, x.new_empty(x.shape[0], weight.shape[0], dtype=compute) if keep else x.new_empty(0)


def _grad_pre(grad, z, activation):
    """dz = dy * act'(z) in PyTorch (a custom op's body runs below autograd: no graph to ask)."""
    if activation == "quick_gelu":  # s + 1.702 z s (1 - s), s = sigmoid(1.702 z)
        s = torch.sigmoid(1.702 * z)
        slope = s + 1.702 * z * s * (1 - s)
    elif activation == "gelu_tanh":  # (1 + t) / 2 + z (1 - t^2) u'(z) / 2, t = tanh(u)
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (z + 0.044715 * z**3))
        slope = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    else:  # gelu: Phi(z) + z phi(z)
        slope = 0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5
    return grad * slope


@torch.library.custom_op("vlmfast::linear_bwd", mutates_args=())
def linear_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    pre: torch.Tensor, activation: str, need_x: bool, need_weight: bool, need_bias: bool,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (M, N) of act(x W^T + b) computed in `compute` -> (dx (M, K), dW (N, K), db (N,)) in
    the dtypes of x, weight and bias; each is an empty (0,) tensor when not needed. pre: the
    forward's pre-activation (M, N), or (0,) (then recomputed when an activation needs it).
    dz = grad * act'(pre) (rounded to `compute`); dx = dz W; dW = dz^T x; db = sum dz, the GEMMs'
    operands rounded to `compute`, accumulated in float32."""
    act = _activation_name(activation)
    if act is not None and pre.numel() != grad.numel():
        pre = _forward(x, weight, bias, None, False, False, compute)[0]  # the forward kept none
    grad = grad.to(compute)
    backend = _dispatch.select("linear", x.device, compute)
    if _runs_backward_kernel(backend, x, weight, bias, act, compute, (need_x, need_weight, need_bias)):
        dx, dw, db = _native_backward(grad, x, weight, bias, pre, act, need_x, need_weight, need_bias, compute)
    else:
        _dispatch.record("linear_bwd", "reference")
        dx, dw, db = _torch_backward(grad, x, weight, bias, pre, act, need_x, need_weight, need_bias, compute)
    if db is not None:
        db = db.to(bias.dtype)
    # Outputs may not alias each other: one fresh empty tensor per missing gradient.
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, db))


@linear_bwd.register_fake
def _(grad, x, weight, bias, pre, activation, need_x, need_weight, need_bias, compute):
    n, k = weight.shape
    return (x.new_empty(x.shape[0], k) if need_x else x.new_empty(0),
            weight.new_empty(n, k) if need_weight else weight.new_empty(0),
            bias.new_empty(n) if need_bias else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _, _, compute = inputs
    # `pre` is an output nobody differentiates: unmaterialised, its gradient stays None instead
    # of a zero-filled (M, N) tensor per backward (~28 ms for a ViT-B MLP's 2048 x 3072)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.activation = activation
    ctx.compute = compute


def _backward(ctx, grad, _grad_pre_output):
    if grad is None:  # unmaterialised: the output took no part in what is differentiated
        return None, None, None, None, None, None, None
    x, weight, bias, pre = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    dx, dw, db = linear_bwd(grad, x, weight, bias, pre, ctx.activation, need_x, need_weight, need_bias,
                            ctx.compute)
    return (dx if need_x else None, dw if need_weight else None, db if need_bias else None,
            None, None, None, None)


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _autocast_dtype(x, weight) -> torch.dtype | None:
    """The dtype CPU autocast computes a linear in, when it is on and would cast these inputs."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return None
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    if not (x.is_floating_point() and weight.is_floating_point()) or torch.float64 in (x.dtype, weight.dtype):
        return None  # autocast leaves float64 alone
    return torch.get_autocast_dtype(device)


def _validate(x, weight, bias, activation, *, mixed: bool) -> None:
    _checks.floating("x", x)
    _checks.floating("weight", weight)
    _checks.rank("weight", weight, 2, "(N, K) like nn.Linear.weight")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected (..., K) with K = weight.shape[1] = {k}, got {_checks.shape_of(x)}")
    if x.dtype != weight.dtype and not mixed:
        raise TypeError(f"x: expected weight's dtype {weight.dtype}, got {x.dtype}")
    if bias is not None:
        if mixed:  # autocast casts the bias too: its dtype may differ from the weight's
            _checks.floating("bias", bias)
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias: expected (N,) = ({n},), got {_checks.shape_of(bias)}")
        else:
            _checks.bias(bias, n, "N", weight)
    _checks.same_device(x=x, weight=weight, **({"bias": bias} if bias is not None else {}))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    activation: str | None = None,
) -> torch.Tensor:
    """act(x @ weight^T + bias): torch.nn.functional.linear with the activation fused.

    Arguments:
        x: (..., K), any strides; float32, float16, bfloat16 or float64.
        weight: (N, K) like nn.Linear.weight, x's dtype and device (under autocast, any float
            dtype autocast would cast).
        bias: (N,) or None.
        activation: None, "quick_gelu" (z sigmoid(1.702 z), OpenAI CLIP), "gelu_tanh"
            (SigLIP's gelu_pytorch_tanh) or "gelu" (erf form).
    Returns:
        (..., N) in x's dtype (under CPU/CUDA autocast: the autocast dtype, as torch's linear);
        differentiable in x, weight and bias. The C++ kernel runs on the CPU for at least SMALL_M
        rows in float32, bfloat16 and float16 (and under autocast); everything else, and any
        shape class where torch's GEMM measured faster here, is PyTorch's own linear.

    In inference (grad disabled) the packed weight is cached per weight tensor and refreshed
    when its version counter moves, which any in-place update through the tensor itself does;
    writes through `weight.data` bypass the counter. While gradients are on nothing is cached,
    frozen weights included: a LoRA or frozen-tower fine-tune would otherwise hold a packed
    second copy of every frozen weight.
    """
    autocast = _autocast_dtype(x, weight)
    _validate(x, weight, bias, activation, mixed=autocast is not None)
    compute = autocast or x.dtype
    n, k = weight.shape
    if (compute not in KERNEL_DTYPES or x.device.type != "cpu" or x.numel() < SMALL_M * max(k, 1)
            or k == 0 or x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES):
        return reference.linear(x, weight, bias, activation)
    rows = x.reshape(-1, k)
    tracked = (x, weight) if bias is None else (x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    cache = not torch.is_grad_enabled() and _CACHING.get()
    if not needs_grad and _plain_eager(x, weight, bias):
        # nothing to differentiate, nothing traced: the op's body without the custom op's
        # dispatch (~40 us a call, and ~70 us where the class went to torch: a SmolLM2 decoder
        # prefill layer's seven Linears, or torch's GEMM of a few ms, feel it)
        out = _forward(rows, weight, bias, _activation_name(activation), False, cache, compute)[0]
    else:
        out, _ = linear_fwd(rows, weight, bias, activation or "none", needs_grad, cache, compute)
    return out.reshape(*x.shape[:-1], n)


def _plain_eager(x, weight, bias) -> bool:
    """Plain tensors (parameters too) outside torch.compile, torch.func and torch.jit.trace: what
    the custom op would only pass through to its body (tensor subclasses, fake tensors,
    transforms and tracing need the op)."""
    return _eager.plain(x) and _eager.plain(weight) and (bias is None or _eager.plain(bias)) and _eager.untraced()
