"""Plain eager inference calls run an op's body without its torch.library custom op (whose first
call imports torch._dynamo: ~1.5 s and ~150 MiB in a process that never compiles), and with the
same result; calls that need the op (a gradient, tracing) still take it."""

import importlib

import pytest
import torch

from vlmfast import ops

# (the package's names are the public functions: the modules through importlib)
linear_module, patch_embed_module, rotary_module, swiglu_module, varlen_module = (
    importlib.import_module(f"vlmfast.ops.{name}")
    for name in ("linear", "patch_embed", "rotary", "swiglu", "attention.varlen"))


def _calls(monkeypatch, module, name):
    """Replaces module.name (a custom op) by a wrapper counting its calls."""
    op = getattr(module, name)
    calls = []

    def counted(*args):
        calls.append(name)
        return op(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 32, generator=g)
    cos, sin = torch.rand(7, 16, generator=g), torch.rand(7, 16, generator=g)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=g)
    weight = torch.nn.Parameter(torch.randn(24, 3, 8, 8, generator=g))
    q, k, v = (torch.randn(9, 2, 16, generator=g) for _ in range(3))
    lin_x, lin_w = torch.randn(40, 24, generator=g), torch.nn.Parameter(torch.randn(48, 24, generator=g))
    positions = torch.randint(0, 9, (11, 2), generator=g)
    return [
        (rotary_module, "rotary_fwd", lambda: ops.apply_rotary_emb(x, cos, sin, seq_dim=1), x),
        (rotary_module, "rope_2d_fwd", lambda: ops.rope_2d(positions, 32)[0], None),
        (patch_embed_module, "patch_embed_fwd",
         lambda: ops.patch_embed(images, weight, mean=[0.5] * 3, std=[0.25] * 3), weight),
        (swiglu_module, "swiglu_fwd", lambda: ops.swiglu(lin_x), lin_x),
        (varlen_module, "attention_varlen_fwd",
         lambda: ops.attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 5), q),
        (linear_module, "linear_fwd", lambda: ops.linear(lin_x, lin_w, activation="gelu_tanh"), lin_w),
    ]


@pytest.mark.parametrize("case", range(6))
def test_inference_skips_the_custom_op_with_the_same_result(monkeypatch, case):
    module, name, call, _ = _cases()[case]
    with torch.no_grad():
        through_op = call()  # a parameter's requires_grad does not matter without grad mode
    calls = _calls(monkeypatch, module, name)
    with torch.inference_mode():
        direct = call()
    assert calls == []
    with torch.no_grad():
        again = call()
    assert calls == []
    torch.testing.assert_close(direct, through_op, rtol=0, atol=0)
    torch.testing.assert_close(again, through_op, rtol=0, atol=0)


@pytest.mark.parametrize("case", [0, 2, 3, 4, 5])
def test_a_call_that_needs_a_gradient_takes_the_custom_op(monkeypatch, case):
    module, name, call, leaf = _cases()[case]
    leaf.requires_grad_(True)
    calls = _calls(monkeypatch, module, name)
    out = call()
    assert calls == [name] and out.requires_grad


def test_jit_tracing_takes_the_custom_op(monkeypatch):
    module, name, call, _ = _cases()[3]
    calls = _calls(monkeypatch, module, name)
    x = torch.randn(5, 2 * 8)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: ops.swiglu(t), (x,), check_trace=False)
    assert calls == [name]
    torch.testing.assert_close(traced(x), ops.reference.swiglu(x))
