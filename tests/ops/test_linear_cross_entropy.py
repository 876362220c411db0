"""vlmfast.ops.linear_cross_entropy against the float64 reference (and F.cross_entropy on
materialised logits) on every backend: odd N, D, V (V not a multiple of any block or chunk),
ignored labels, the three reductions, bias, label smoothing, fp16/bf16 with large logits,
several row blocks / vocabulary chunks, opcheck, torch.compile and each kind of bad input."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast import nn as vnn
from vlmfast import ops
from vlmfast.ops import cross_entropy as lce_ops
from vlmfast.ops import reference

# (N, D, V). The C++ logit block is 96 rows x (V rounded to 96); the Triton tiles 16 x 32 under
# the interpreter, which is slow: it gets fewer rows.
CASES = {
    "default": [(1, 16, 1), (7, 72, 97), (131, 16, 1000), (131, 72, 1000)],
    "triton": [(1, 16, 1), (7, 72, 97), (19, 16, 300), (17, 72, 197)],
}
REDUCTIONS = ("mean", "sum", "none")


def _inputs(n, d, v, dtype=torch.float32, *, scale=1.0, bias=False, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) * scale / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        labels[i % n] = -100
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    return hidden, weight, labels, b


def _loss_and_grads(fn, hidden, weight, labels, bias, upstream=None, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None, **kwargs)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).abs() + 0.5
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return loss.detach(), grads, upstream


def _materialised_low_precision(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                                label_smoothing=0.0):
    """What torch does in the inputs' dtype: the GEMM (and its backward) in that dtype, the loss
    on the float32 upcast logits (as transformers' loss does)."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    valid = reference.lce_valid(labels, ignore_index, weight.shape[0])
    rows = F.cross_entropy(logits.float(), torch.where(valid, labels, 0), reduction="none",
                           label_smoothing=label_smoothing)
    return reference.lce_reduce(torch.where(valid, rows, 0.0), valid, reduction)


def _reference64(hidden, weight, labels, bias=None, **kwargs):
    return reference.linear_cross_entropy(hidden, weight, labels, bias, **kwargs)


def _check(hidden, weight, labels, bias=None, **kwargs):
    """Loss and gradients of the fused op against the float64 reference, with the tolerance
    rule against torch's materialised computation in the inputs' dtype for fp16 / bf16."""
    loss, grads, upstream = _loss_and_grads(ops.linear_cross_entropy, hidden, weight, labels, bias, **kwargs)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    loss64, grads64, _ = _loss_and_grads(_reference64, as64[0], as64[1], labels, as64[2], upstream.double(), **kwargs)
    low = low_grads = (None,) * 3
    if hidden.dtype in (torch.float16, torch.bfloat16):
        low, low_grads, _ = _loss_and_grads(_materialised_low_precision, hidden, weight, labels, bias, upstream, **kwargs)
    assert loss.dtype == torch.float32
    assert_close(loss, loss64.float(), low if hidden.dtype != torch.float32 else None, name="loss")
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for i, (grad, grad64) in enumerate(zip(grads, grads64)):
        lowg = low_grads[i] if hidden.dtype != torch.float32 else None
        assert grad.dtype == hidden.dtype
        assert_close(grad, grad64, lowg, factor=3.0, name=names[i])


def _case(backend, index):
    return CASES.get(backend.name, CASES["default"])[index]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_float32(backend, index, reduction):
    n, d, v = _case(backend, index)
    hidden, weight, labels, bias = _inputs(n, d, v, bias=index % 2 == 1, ignored=(3, 5) if n > 1 else ())
    _check(hidden, weight, labels, bias, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_large_logits(backend, dtype, reduction):
    """Logits in the hundreds: exp overflows even float32 without the running max."""
    n, d, v = _case(backend, 3)
    hidden, weight, labels, bias = _inputs(n, d, v, dtype, scale=20.0, bias=True, ignored=(2,))
    _check(hidden, weight, labels, bias, reduction=reduction)
    loss = ops.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    assert torch.isfinite(loss).all() and loss.abs().max() > 10


def test_label_smoothing(backend):
    n, d, v = _case(backend, 3)
    hidden, weight, labels, bias = _inputs(n, d, v, bias=True, ignored=(0,))
    for reduction in ("mean", "none"):
        _check(hidden, weight, labels, bias, reduction=reduction, label_smoothing=0.1)


def test_custom_ignore_index_inside_the_vocabulary(backend):
    n, d, v = _case(backend, 1)
    hidden, weight, labels, _ = _inputs(n, d, v)
    labels[::2] = 5
    _check(hidden, weight, labels, ignore_index=5, reduction="mean")


def test_all_labels_ignored_gives_zero_not_nan(backend):
    """Deliberate difference from torch: "mean" over no labels is 0 with zero gradients."""
    hidden, weight, labels, bias = _inputs(5, 16, 97, bias=True)
    labels[:] = -100
    for reduction in REDUCTIONS:
        loss, grads, _ = _loss_and_grads(ops.linear_cross_entropy, hidden, weight, labels, bias, reduction=reduction)
        assert (loss == 0).all()
        assert all((g == 0).all() for g in grads)
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, labels))


def test_reference_equals_torch_cross_entropy():
    hidden, weight, labels, bias = _inputs(33, 24, 101, torch.float64, bias=True, ignored=(1, 4))
    logits = hidden @ weight.T + bias
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            expected = F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=smoothing)
            actual = reference.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction,
                                                    label_smoothing=smoothing)
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_fused_equals_torch_on_materialised_logits(backend):
    n, d, v = _case(backend, 2)
    hidden, weight, labels, _ = _inputs(n, d, v, ignored=(1,))
    expected = F.cross_entropy(hidden.double() @ weight.double().T, labels)
    assert_close(ops.linear_cross_entropy(hidden, weight, labels), expected.float())


def test_batched_hidden_and_tied_weight_module(backend):
    """(B, L, D) hidden with an nn.Embedding's weight as the head (tied), through the module."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(97, 16)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, 97, (2, 5))
    labels[0, 0] = -100
    module = vnn.LinearCrossEntropy(reduction="none")
    loss = module(hidden, embedding.weight, labels)
    assert loss.shape == (2, 5)
    loss.sum().backward()
    expected = F.cross_entropy((hidden @ embedding.weight.T).double().flatten(0, 1), labels.flatten(), reduction="none")
    assert_close(loss.detach(), expected.view(2, 5).float())
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_several_row_blocks_and_threads(dtype):
    """Rows in 96-row blocks, each thread owning a share of the vocabulary (the problem is big
    enough for the kernel to start every thread torch allows); bfloat16 takes the AVX512-BF16
    dot-product GEMMs where the CPU has them."""
    from vlmfast.native import linear_cross_entropy as native_lce

    hidden, weight, labels, bias = _inputs(300, 72, 2000, dtype, bias=True, ignored=(7, 150))
    scale = torch.rand(300) + 0.5
    loss_rows, lse, gh, gw, gb = native_lce.forward(hidden, weight, bias, labels, -100, 0.05, scale, block_rows=96)
    as64 = [t.double() for t in (hidden, weight, bias)]
    rows64, lse64 = reference.lce_rows(*as64[:2], as64[2], labels, -100, 0.05)
    grads64 = reference.lce_grads(*as64[:2], as64[2], labels, scale.double(), -100, 0.05)
    low = (None,) * 3
    if dtype != torch.float32:
        _, low, _ = _loss_and_grads(_materialised_low_precision, hidden, weight, labels, bias, scale,
                                    reduction="none", label_smoothing=0.05)
    assert_close(loss_rows, rows64.float())
    assert_close(lse, lse64.float())
    for grad, grad64, lowg in zip((gh, gw, gb.to(dtype)), grads64, low):
        assert_close(grad, grad64, lowg, factor=3.0)


@pytest.mark.parametrize("d, v, sliced", [(64, 2000, False), (32, 960, False), (64, 1000, True)])
def test_cpp_float32_weight_read_in_place(d, v, sliced):
    """A float32 weight whose rows are a multiple of 32 apart is read in place and its gradient
    accumulated straight into grad_weight; only the last partial 96-row unit of the vocabulary is
    copied (V = 2000: a 80-row tail; 960: none). A sliced weight (row stride != D) takes the copy."""
    from vlmfast.native import linear_cross_entropy as native_lce

    hidden, weight, labels, bias = _inputs(300, d, v, bias=True, ignored=(7, 150))
    if sliced:
        weight = torch.cat([weight, torch.randn(v, 32)], dim=1)[:, :d]
    scale = torch.rand(300) + 0.5
    weight_before = weight.clone()
    loss_rows, lse, gh, gw, gb = native_lce.forward(hidden, weight, bias, labels, -100, 0.05, scale, block_rows=96)
    as64 = [t.double() for t in (hidden, weight, bias)]
    rows64, lse64 = reference.lce_rows(*as64[:2], as64[2], labels, -100, 0.05)
    grads64 = reference.lce_grads(*as64[:2], as64[2], labels, scale.double(), -100, 0.05)
    assert torch.equal(weight, weight_before)
    assert_close(loss_rows, rows64.float())
    assert_close(lse, lse64.float())
    for grad, grad64 in zip((gh, gw, gb), grads64):
        assert_close(grad, grad64, factor=3.0)


def test_gradients_recomputed_in_the_backward_are_the_same(backend):
    """grads_in_forward=False: the backward recomputes the logits instead of scaling gradients the
    forward formed; same loss and gradients (against float64), for "mean" and "sum"."""
    hidden, weight, labels, bias = _inputs(131, 72, 1000, bias=True, ignored=(3, 5))
    for reduction in ("mean", "sum"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = ops.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], reduction=reduction,
                                        grads_in_forward=False)
        (loss * 1.5).backward()
        as64 = [t.double().requires_grad_() for t in (hidden, weight, bias)]
        loss64 = ops.linear_cross_entropy(as64[0], as64[1], labels, bias=as64[2], reduction=reduction)
        (loss64 * 1.5).backward()
        assert_close(loss, loss64.float())
        for leaf, leaf64 in zip(leaves, as64):
            assert_close(leaf.grad, leaf64.grad, factor=3.0)


def test_triton_several_vocabulary_chunks():
    from vlmfast.kernels import linear_cross_entropy as triton_lce

    hidden, weight, labels, bias = _inputs(19, 16, 197, bias=True, ignored=(3,))
    scale = torch.rand(19) + 0.5
    _, _, gh, gw, gb = triton_lce.forward(hidden, weight, bias, labels, -100, 0.1, scale, vocab_chunk=64)
    grads64 = reference.lce_grads(hidden.double(), weight.double(), bias.double(), labels, scale.double(), -100, 0.1)
    for grad, grad64 in zip((gh, gw, gb), grads64):
        assert_close(grad, grad64)


def test_triton_lse_sweep_split_over_the_vocabulary():
    """The log-sum-exp sweep cut into spans of the vocabulary (programs combined after) gives the
    one-sweep answer, and both the float64 reference's."""
    from vlmfast.kernels import linear_cross_entropy as triton_lce

    hidden, weight, labels, bias = _inputs(21, 40, 331, bias=True, ignored=(2,))
    lse64 = reference.lce_rows(hidden.double(), weight.double(), bias.double(), labels, -100, 0.0)[1]
    for splits in (1, 3, 11, None):
        lse, target, total = triton_lce.lse_pass(hidden, weight, bias.float(), labels, splits)
        assert_close(lse, lse64.float())
        logits64 = hidden.double() @ weight.double().T + bias.double()
        assert_close(total, logits64.sum(1).float(), name="sum of logits")
        valid = labels >= 0
        assert_close(target[valid], logits64[valid, labels[valid]].float(), name="target logit")


def test_triton_16bit_gradients_over_several_chunks():
    """bfloat16: G in bf16, the chunk GEMMs on bf16 operands with float32 sums, d hidden summed
    over chunks in float32; within the rule against torch's materialised bf16 backward."""
    from vlmfast.kernels import linear_cross_entropy as triton_lce

    hidden, weight, labels, bias = _inputs(19, 32, 197, torch.bfloat16, scale=3.0, bias=True, ignored=(4,))
    scale = torch.rand(19) + 0.5
    lse = triton_lce.lse_pass(hidden, weight, bias.float(), labels)[0]
    gh, gw, gb = triton_lce.backward(hidden, weight, bias, labels, lse, scale, -100, 0.1, vocab_chunk=64)
    exact = reference.lce_grads(hidden.double(), weight.double(), bias.double(), labels, scale.double(), -100, 0.1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    rows = _materialised_low_precision(*leaves[:2], labels, leaves[2], reduction="none", label_smoothing=0.1)
    low = torch.autograd.grad((rows * scale).sum(), leaves)
    for name, got, want, lo in zip(("grad_hidden", "grad_weight", "grad_bias"), (gh, gw, gb), exact, low):
        assert_close(got.to(lo.dtype) if name == "grad_bias" else got, want, lo, factor=3.0, name=name)


def test_triton_sliced_backward_equals_the_whole_one():
    """update=: the weight's gradient handed over in vocabulary slices is the whole gradient's
    rows, and d hidden / d bias are the same (one chunk loop serves both)."""
    from vlmfast.kernels import linear_cross_entropy as triton_lce

    hidden, weight, labels, bias = _inputs(13, 24, 150, bias=True, ignored=(1,))
    scale = torch.rand(13) + 0.5
    lse = triton_lce.lse_pass(hidden, weight, bias, labels)[0]
    whole = triton_lce.backward(hidden, weight, bias, labels, lse, scale, -100, 0.0, vocab_chunk=64)
    slices = []
    sliced = triton_lce.backward(hidden, weight, bias, labels, lse, scale, -100, 0.0, vocab_chunk=64,
                                 update=lambda where, rows: slices.append((where, rows.clone())))
    assert sliced[1] is None and [w for w, _ in slices] == [slice(0, 64), slice(64, 128), slice(128, 150)]
    torch.testing.assert_close(torch.cat([r for _, r in slices]), whole[1], rtol=0, atol=0)
    torch.testing.assert_close(sliced[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(sliced[2], whole[2], rtol=0, atol=0)


def test_triton_backward_reuses_the_forward_lse(monkeypatch):
    """grads_in_forward=False: the backward gets the forward's lse and sweeps the vocabulary
    once more only for G, not for the log-sum-exp."""
    from vlmfast.kernels import linear_cross_entropy as triton_lce

    monkeypatch.setenv("VLMFAST_BACKEND", "triton")
    hidden, weight, labels, _ = _inputs(9, 16, 100, ignored=(3,))
    sweeps = []
    lse_pass = triton_lce.lse_pass
    monkeypatch.setattr(triton_lce, "lse_pass", lambda *a, **k: sweeps.append(1) or lse_pass(*a, **k))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss = ops.linear_cross_entropy(*leaves, labels, grads_in_forward=False)
    assert sweeps == [1]
    loss.backward()
    assert sweeps == [1]
    _, grads64, _ = _loss_and_grads(_reference64, hidden.double(), weight.double(), labels, None,
                                    torch.tensor(1.0, dtype=torch.float64))
    for leaf, grad64 in zip(leaves, grads64):
        assert_close(leaf.grad, grad64)


def test_no_grad_and_mean_backward_by_recomputation(backend):
    """Under no_grad the forward makes no gradients; the forward op without them still
    differentiates (through linear_cross_entropy_bwd) for "mean"."""
    n, d, v = _case(backend, 1)
    hidden, weight, labels, bias = _inputs(n, d, v, bias=True, ignored=(2,))
    with torch.no_grad():
        out = lce_ops.linear_cross_entropy_fwd(hidden, weight, bias, labels, -100, 0.0, "mean", False)
    assert all(t.numel() == 0 for t in out[2:])
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = lce_ops.linear_cross_entropy_fwd(*leaves, labels, -100, 0.0, "mean", False)[0]
    grads = torch.autograd.grad(loss * 1.5, leaves)
    _, grads64, _ = _loss_and_grads(_reference64, hidden.double(), weight.double(), labels, bias.double(), torch.tensor(1.5, dtype=torch.float64))
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64)


def test_opcheck(backend):
    hidden, weight, labels, bias = _inputs(7, 16, 97, bias=True, ignored=(1,))
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    for reduction, with_grads in (("mean", True), ("sum", False), ("none", False)):
        torch.library.opcheck(lce_ops.linear_cross_entropy_fwd, (h, w, b, labels, -100, 0.1, reduction, with_grads))
    torch.library.opcheck(lce_ops.linear_cross_entropy_fwd, (h, w, None, labels, -100, 0.0, "mean", True))
    scale = torch.rand(7)
    torch.library.opcheck(lce_ops.linear_cross_entropy_bwd, (hidden, weight, bias, labels, scale, -100, 0.0))
    torch.library.opcheck(lce_ops.linear_cross_entropy_bwd, (hidden, weight, None, labels, scale, -100, 0.0))
    lse = reference.lce_rows(hidden, weight, bias, labels, -100, 0.0)[1]
    torch.library.opcheck(lce_ops.linear_cross_entropy_bwd, (hidden, weight, bias, labels, scale, -100, 0.0, lse))


def test_torch_compile_fullgraph():
    hidden, weight, labels, bias = _inputs(7, 16, 97, bias=True, ignored=(1,))
    compiled = torch.compile(lambda h, w, y, b: ops.linear_cross_entropy(h, w, y, bias=b), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = compiled(leaves[0], leaves[1], labels, leaves[2])
    grads = torch.autograd.grad(loss, leaves)
    expected, expected_grads, _ = _loss_and_grads(_reference64, hidden.double(), weight.double(), labels, bias.double(), torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss.detach(), expected.float())
    for grad, grad64 in zip(grads, expected_grads):
        assert_close(grad, grad64)


def test_bad_inputs():
    hidden, weight, labels, bias = _inputs(7, 16, 97, bias=True)
    fn = ops.linear_cross_entropy
    with pytest.raises(ValueError, match=r"labels: expected \(N,\) = \(7,\) .*got \(7, 1\)"):
        fn(hidden, weight, labels[:, None])
    with pytest.raises(TypeError, match="labels: expected an int64 tensor.*torch.int32"):
        fn(hidden, weight, labels.int())
    with pytest.raises(ValueError, match=r"weight: expected \(V, D\) with D = hidden.shape\[-1\] = 16, got \(97, 15\)"):
        fn(hidden, weight[:, :15], labels)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, V\) = \[0, 97\) or ignore_index = -100, got 97"):
        fn(hidden, weight, torch.where(labels == labels[0], 97, labels))
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, V\) = \[0, 97\).*got -3"):
        fn(hidden, weight, torch.full_like(labels, -3))
    with pytest.raises(ValueError, match=r"hidden: expected \(N, D\) or \(B, L, D\), got \(16\)"):
        fn(hidden[0], weight, labels)
    with pytest.raises(ValueError, match=r"weight: expected \(V, D\) = \(V, 16\) as nn.Linear's weight, got \(1, 97, 16\)"):
        fn(hidden, weight[None], labels)
    with pytest.raises(ValueError, match=r"bias: expected \(V,\) = \(97,\), got \(96\)"):
        fn(hidden, weight, labels, bias=bias[:96])
    with pytest.raises(TypeError, match="weight: expected the dtype of hidden"):
        fn(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="hidden: expected a float32, float16, bfloat16 or float64 tensor"):
        fn(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="reduction: expected one of 'mean', 'sum', 'none', got 'avg'"):
        fn(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\]"):
        fn(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap: expected None or a positive float"):
        fn(hidden, weight, labels, softcap=0.0)
    meta = torch.empty(97, 16, device="meta")
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu like hidden, got meta"):
        fn(hidden, meta, labels)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        vnn.LinearCrossEntropy(reduction="avg")


def test_softcap_runs_the_reference_formula():
    hidden, weight, labels, _ = _inputs(7, 16, 97, scale=10.0)
    loss = ops.linear_cross_entropy(hidden, weight, labels, softcap=30.0)
    logits = 30.0 * torch.tanh((hidden.double() @ weight.double().T) / 30.0)
    assert_close(loss, F.cross_entropy(logits, labels).float())
