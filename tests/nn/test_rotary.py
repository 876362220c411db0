"""Rotary2D and the learnable RoPE-Mixed module."""

import torch

from vlmfast import ops
from vlmfast.nn import Rotary2D, RotaryMixed2D
from vlmfast.nn.rotary import grid_positions


def test_grid_positions_raster_order():
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rotary2d_grid_tables_match_rope_2d_and_are_cached():
    rotary = Rotary2D(head_dim=40, theta=100.0)
    cos, sin = rotary.for_grid(3, 5)
    expected_cos, expected_sin = ops.rope_2d(grid_positions(3, 5), 40, theta=100.0)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert rotary.for_grid(3, 5)[0] is cos


def test_rope_mixed_matches_explicit_per_head_rotation():
    torch.manual_seed(0)
    heads, head_dim = 3, 16
    rotary = RotaryMixed2D(head_dim, heads, generator=torch.Generator().manual_seed(1))
    positions = grid_positions(4, 3)
    x = torch.randn(2, heads, positions.shape[0], head_dim)
    out = rotary.rotate(x, positions)
    for h in range(heads):
        angle = positions[:, :1] * rotary.freq_row[h] + positions[:, 1:] * rotary.freq_col[h]
        expected = ops.reference.apply_rotary_emb(x[:, h].double(), angle.cos().double(), angle.sin().double())
        torch.testing.assert_close(out[:, h].double(), expected, rtol=1e-5, atol=1e-5)


def test_rope_mixed_frequencies_train():
    """Gradients reach the learnable frequencies through the op's table gradient, and agree with
    the gradient of the float64 reference."""
    heads, head_dim = 2, 8
    rotary = RotaryMixed2D(head_dim, heads, generator=torch.Generator().manual_seed(3))
    positions = grid_positions(3, 3)
    x = torch.randn(1, heads, 9, head_dim)
    target = torch.randn_like(x)
    loss = (rotary.rotate(x, positions) - target).pow(2).sum()
    loss.backward()

    freq_row = rotary.freq_row.detach().double().requires_grad_()
    freq_col = rotary.freq_col.detach().double().requires_grad_()
    pos = positions.double()
    angle = (pos[None, :, 0, None] * freq_row[:, None] + pos[None, :, 1, None] * freq_col[:, None]).flatten(0, 1)
    flat = x.double().reshape(1, heads * 9, head_dim)
    expected = ops.reference.apply_rotary_emb(flat, angle.cos(), angle.sin(), False, 1).view(x.shape)
    (expected - target.double()).pow(2).sum().backward()
    torch.testing.assert_close(rotary.freq_row.grad.double(), freq_row.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotary.freq_col.grad.double(), freq_col.grad, rtol=1e-4, atol=1e-4)

    before = rotary.freq_row.detach().clone()
    torch.optim.SGD(rotary.parameters(), lr=0.1).step()
    assert not torch.equal(before, rotary.freq_row.detach())
