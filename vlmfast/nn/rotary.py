"""Rotary embeddings for patch grids: fixed 2D tables (Qwen2-VL) and learnable RoPE-Mixed.

    rotary = Rotary2D(head_dim=64)
    cos, sin = rotary(grid_positions(14, 14))        # (196, 32) each
    q = ops.apply_rotary_emb(q, cos, sin)            # q: (B, H, 196, 64)

RoPE-Mixed (Heo et al., "Rotary Position Embedding for Vision Transformer", 2024) gives every head
its own learnable frequencies that mix rows and columns: angle = row * f_row + col * f_col.
"""

import math

import torch
from torch import nn

from vlmfast import ops


def grid_positions(height: int, width: int, device=None) -> torch.Tensor:
    """int64 (height * width, 2): the (row, col) of each patch in raster order."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack((rows, cols), dim=1)


class Rotary2D(nn.Module):
    """Fixed 2D rotary tables: a quarter of the head dim turns with the row, a quarter with the
    column, as Qwen2-VL's vision tower. Tables are cached per grid size and device."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: expected a multiple of 4, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer (N, 2) -> (cos, sin), float32 (N, head_dim / 2)."""
        return ops.rope_2d(positions, self.head_dim, theta=self.theta)

    def for_grid(self, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for a height x width patch grid in raster order, cached."""
        key = (height, width, str(device))
        if key not in self._cache:
            self._cache[key] = self(grid_positions(height, width, device))
        return self._cache[key]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class RotaryMixed2D(nn.Module):
    """Learnable per-head mixed-axis rotary frequencies (RoPE-Mixed).

    Each head h and pair j turns by row * f_row[h, j] + col * f_col[h, j]. Initialised as in the
    paper: magnitudes theta^(-4k / E) along a random direction per head, the second half of the
    pairs along the perpendicular direction.
    """

    def __init__(self, head_dim: int, num_heads: int, theta: float = 10.0, generator=None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: expected a multiple of 4, got {head_dim}")
        self.head_dim, self.num_heads = head_dim, num_heads
        magnitude = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim)
        direction = torch.rand(num_heads, 1, generator=generator) * 2 * math.pi
        angles = torch.cat((direction, direction + math.pi / 2), dim=1)  # (H, 2)
        # (H, 2, E/4) -> (H, E/2): both directions, every magnitude.
        self.freq_row = nn.Parameter((magnitude * angles.cos()[..., None]).flatten(1))
        self.freq_col = nn.Parameter((magnitude * angles.sin()[..., None]).flatten(1))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer (N, 2) -> (cos, sin), float32 (H * N, head_dim / 2), rows ordered
        head-major so they match x of shape (B, H, N, E) seen as (B, H * N, E)."""
        pos = positions.to(self.freq_row.dtype)
        angle = pos[None, :, 0, None] * self.freq_row[:, None] + pos[None, :, 1, None] * self.freq_col[:, None]
        angle = angle.flatten(0, 1)
        return angle.cos(), angle.sin()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, N, E) -> the same, each head rotated by its own frequencies."""
        batch, heads, tokens, head_dim = x.shape
        if heads != self.num_heads or head_dim != self.head_dim:
            raise ValueError(
                f"x: expected (B, {self.num_heads}, N, {self.head_dim}), got {tuple(x.shape)}"
            )
        cos, sin = self(positions)
        flat = x.reshape(batch, heads * tokens, head_dim)
        return ops.apply_rotary_emb(flat, cos, sin, seq_dim=1).view(x.shape)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}"
