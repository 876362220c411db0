"""ops.linear_cross_entropy and ops.embedding with weight_used_once=True and a slice-taking
optimizer registered in vlmfast.ops.weight_updates: the weight gradient arrives in row slices
that cover [0, V) once, in order, and equal the reference's rows (float64 for the loss, torch's
embedding backward for the table); the other gradients equal the reference; weight.grad is
never formed. Declined, unregistered or without the flag: the usual whole gradient."""

import pytest
import torch

from tests.tolerance import assert_close
from vlmfast import ops
from vlmfast.ops import reference, weight_updates


def _inputs(n, d, v, dtype, *, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    upstream = torch.rand(n, generator=g) + 0.5
    return hidden, weight, labels, b, upstream


def _reference_grads(hidden, weight, labels, bias, upstream, reduction, label_smoothing):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = reference.linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
                                          -100, reduction, label_smoothing)
    (loss * upstream.double()).sum().backward() if reduction == "none" else loss.backward()
    return [t.grad for t in leaves]


class Recorder:
    def __init__(self, accept=True):
        self.accept, self.begun, self.slices = accept, 0, []

    def begin(self, weight):
        self.begun += 1
        return self.update if self.accept else None

    def update(self, rows: slice, grad: torch.Tensor):
        self.slices.append((rows, grad.clone()))


@pytest.fixture
def small_slices(monkeypatch):
    # 64-row slices (the smallest) whatever N and D: V = 1000 gives 16 slices, the last one short
    monkeypatch.setattr(weight_updates, "SLICE_BYTES", 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias, label_smoothing", [(False, 0.0), (True, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_arrives_in_slices(small_slices, reduction, bias, label_smoothing, dtype):
    hidden, weight, labels, b, upstream = _inputs(23, 40, 1000, dtype, bias=bias)
    recorder = Recorder()
    handle = weight_updates.register(weight, recorder.begin)
    try:
        loss = ops.linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction,
                                        label_smoothing=label_smoothing, weight_used_once=True)
        (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
    finally:
        handle.remove()
    assert weight.grad is None and recorder.begun == 1
    starts = [rows.start for rows, _ in recorder.slices]
    assert starts == list(range(0, 1000, 64)) and recorder.slices[-1][0].stop == 1000
    grad_weight = torch.cat([grad for _, grad in recorder.slices])
    assert grad_weight.dtype == dtype
    expected = _reference_grads(hidden, weight, labels, b, upstream, reduction, label_smoothing)
    # bfloat16: within twice the error of the usual fused backward in bfloat16
    usual = [None] * 3
    if dtype != torch.float32:
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
        loss = ops.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None,
                                        reduction=reduction, label_smoothing=label_smoothing)
        (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
        usual = [t.grad for t in leaves] + [None]
    assert_close(hidden.grad, expected[0], usual[0], name="d hidden")
    assert_close(grad_weight, expected[1], usual[1], name="d weight")
    if bias:
        assert_close(b.grad, expected[2], usual[2], name="d bias")


def test_the_slice_update_sees_the_weight_before_it_changes(small_slices):
    # an optimizer that overwrites each slice as it arrives must not change d hidden
    hidden, weight, labels, _, _ = _inputs(9, 16, 300, torch.float32, bias=False)
    expected = _reference_grads(hidden, weight, labels, None, None, "mean", 0.0)

    def begin(w):
        def update(rows, grad):
            w.detach()[rows] = 7.0
        return update

    handle = weight_updates.register(weight, begin)
    ops.linear_cross_entropy(hidden, weight, labels, weight_used_once=True).backward()
    handle.remove()
    assert_close(hidden.grad, expected[0])
    assert bool((weight.detach() == 7.0).all())


@pytest.mark.parametrize("case", ["declined", "flag off", "not registered", "removed"])
def test_otherwise_the_whole_gradient(case):
    hidden, weight, labels, _, _ = _inputs(11, 24, 130, torch.float32, bias=False)
    recorder = Recorder(accept=case != "declined")
    handle = weight_updates.register(weight, recorder.begin) if case != "not registered" else None
    if case == "removed":
        handle.remove()
        assert not weight_updates.registered(weight)
    ops.linear_cross_entropy(hidden, weight, labels, weight_used_once=case != "flag off").backward()
    if handle is not None:
        handle.remove()
    assert recorder.slices == [] and recorder.begun == (1 if case == "declined" else 0)
    expected = _reference_grads(hidden, weight, labels, None, None, "mean", 0.0)
    assert_close(weight.grad, expected[1])
    assert_close(hidden.grad, expected[0])


def test_register_rejects_a_non_tensor():
    with pytest.raises(TypeError, match="weight: expected a tensor"):
        weight_updates.register([1.0], lambda w: None)


# ----------------------------------------------------------------------------- embedding


def _table(v=300, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g).requires_grad_()
    ids = torch.randint(0, v, (3, 17), generator=g)
    ids[0, :4] = 5  # repeated ids add up
    ids[1, 0], ids[1, 1] = 0, v - 1  # the first and the last row
    return ids, weight, torch.randn(3, 17, d, generator=g)


def _torch_table_grad(ids, weight, upstream, padding_idx=None):
    w = weight.detach().clone().requires_grad_()
    torch.nn.functional.embedding(ids, w, padding_idx).backward(upstream)
    return w.grad


@pytest.mark.parametrize("padding_idx", [None, 5, -1])
def test_embedding_gradient_arrives_in_slices(small_slices, padding_idx):
    ids, weight, upstream = _table()
    recorder = Recorder()
    handle = weight_updates.register(weight, recorder.begin)
    out = ops.embedding(ids, weight, padding_idx, weight_used_once=True)
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, weight), rtol=0, atol=0)
    out.backward(upstream)
    handle.remove()
    assert weight.grad is None and recorder.begun == 1
    assert [rows.start for rows, _ in recorder.slices] == [0, 64, 128, 192, 256]
    grad = torch.cat([g for _, g in recorder.slices])
    torch.testing.assert_close(grad, _torch_table_grad(ids, weight, upstream, padding_idx), rtol=1e-6, atol=1e-6)
    if padding_idx is not None:
        assert not grad[padding_idx].any()


@pytest.mark.parametrize("case", ["declined", "flag off", "not registered"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_otherwise_the_whole_gradient(case, padding_idx):
    ids, weight, upstream = _table(seed=1)
    recorder = Recorder(accept=case != "declined")
    handle = weight_updates.register(weight, recorder.begin) if case != "not registered" else None
    ops.embedding(ids, weight, padding_idx, weight_used_once=case != "flag off").backward(upstream)
    if handle is not None:
        handle.remove()
    assert recorder.slices == []
    expected = _torch_table_grad(ids, weight, upstream, padding_idx)
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)


def test_embedding_bad_inputs_name_the_argument():
    weight = torch.randn(10, 4)
    with pytest.raises(TypeError, match="ids"):
        ops.embedding(torch.zeros(3), weight)
    with pytest.raises(ValueError, match=r"weight: expected .*\(V, D\)"):
        ops.embedding(torch.zeros(3, dtype=torch.long), torch.randn(10))
    with pytest.raises(ValueError, match="padding_idx: expected None or an index into the 10 rows, got 10"):
        ops.embedding(torch.zeros(3, dtype=torch.long), weight, 10)
