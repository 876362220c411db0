"""kernels/attention.py's launchers directly (interpreter): rotary where it is not fused (E > 128,
and float32 inputs: q and k rotated by the rotary kernel first, dq and dk rotated back) against
the float64 reference, dense and packed."""

import pytest
import torch

from vlmfast.kernels import attention
from vlmfast.ops import reference
from tests.tolerance import assert_close


def _reference(q, k, v, cos, sin, causal):
    rotate = lambda x: reference.apply_rotary_emb(x, cos.double(), sin.double(), False, 2)  # noqa: E731
    return torch.nn.functional.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=causal)


@pytest.mark.parametrize("head_dim, rotary_dim", [(160, 64), (256, 256)])
def test_rotary_beyond_the_fused_head_dims(head_dim, rotary_dim):
    assert not attention.fuses_rotary(attention._block_e(head_dim), torch.bfloat16)
    g = torch.Generator().manual_seed(head_dim)
    length, scale = 9, head_dim**-0.5
    q, k, v = (torch.randn(1, 2, length, head_dim, generator=g) for _ in range(3))
    angles = torch.rand(length, rotary_dim // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    out, lse = attention.forward(q, k, v, scale=scale, is_causal=True, rotary=(cos, sin))
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    expected = _reference(*exact, cos, sin, True)
    assert_close(out, expected.detach().float())
    grad = torch.randn(out.shape, generator=g)
    grads = attention.backward(grad, q, k, v, out, lse, scale=scale, is_causal=True, rotary=(cos, sin))
    expected.backward(grad.double())
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, exact):
        assert_close(got, leaf.grad.float(), name=name)

    # packed: the two sequences of q's rows, tables one row per packed token
    cu = torch.tensor([0, 4, length], dtype=torch.int32)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (T, H, E)
    out_p, lse_p = attention.forward_varlen(*packed, cu, 5, scale=scale, is_causal=True, rotary=(cos, sin))
    grads_p = attention.backward_varlen(grad[0].transpose(0, 1).contiguous(), *packed, out_p, lse_p, cu, 5,
                                        scale=scale, is_causal=True, rotary=(cos, sin))
    for start, stop in ((0, 4), (4, length)):
        part = [t.double()[:, :, start:stop].requires_grad_() for t in (q, k, v)]
        part_out = _reference(*part, cos[start:stop], sin[start:stop], True)
        assert_close(out_p[start:stop].transpose(0, 1), part_out[0].detach().float())
        part_out.backward(grad.double()[:, :, start:stop])
        for got, leaf in zip(grads_p, part):
            assert_close(got[start:stop].transpose(0, 1), leaf.grad[0].float())
