"""Where every patch of a packed Qwen2-VL batch sits: its (row, col) for the 2D rotary, the
attention segments (one per frame), and Qwen2.5-VL's windows.

The processor lays an image of t x h x w patches out frame by frame, each frame in blocks of
m x m neighbouring patches (m = spatial_merge_size), blocks in raster order: the merger then
turns every m^2 consecutive tokens into one. All of this is index arithmetic on grid_thw, done
once per forward on the CPU and shared by every block.

Qwen2.5-VL's window attention: the merged grid of each frame is cut into windows of
window_size / (m * patch_size) merged tokens a side (smaller at the right and bottom edges); the
tokens are reordered window by window (m^2 patches per merged token kept together) so that each
window is one contiguous segment of attention_varlen, and put back in order after the merger.
"""

from dataclasses import dataclass

import torch


@dataclass
class VisionLayout:
    """positions: int64 (T, 2) (row, col) of each token, in the order the blocks see them;
    cu_seqlens: int32 (frames + 1,) one segment per frame; max_seqlen: the largest frame;
    window_index: int64 (T / m^2,) the merged token at each place of the window order, or None
    (no windows); cu_window_seqlens / max_window_seqlen: the window segments (or None)."""

    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    window_index: torch.Tensor | None = None
    cu_window_seqlens: torch.Tensor | None = None
    max_window_seqlen: int = 0


def _cumulative(lengths: list[int], device) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def frame_positions(h: int, w: int, merge: int) -> torch.Tensor:
    """int64 (h * w, 2): (row, col) of the patches of one frame in merge-block order."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)

    def blocked(grid):  # (h, w) -> (h/m, w/m, m, m) -> flat: block by block, each row-major
        return grid.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()

    return torch.stack((blocked(rows), blocked(cols)), dim=1)


def window_order(t: int, gh: int, gw: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens of one image (t frames of gh x gw) in window order, and each window's
    merged-token count. Windows are side x side, cut from the top-left; edge windows are smaller."""
    index = torch.arange(t * gh * gw).view(t, gh, gw)
    nh, nw = -(-gh // side), -(-gw // side)
    padded = torch.full((t, nh * side, nw * side), -1, dtype=torch.long)
    padded[:, :gh, :gw] = index
    windows = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
    valid = windows >= 0
    return windows[valid], valid.sum(dim=1).tolist()


def vision_layout(grid_thw: list[tuple[int, int, int]], merge: int, window_side: int | None = None,
                  device=None) -> VisionLayout:
    """The layout of images / videos of grids (t, h, w) in patches packed in that order.
    window_side: Qwen2.5-VL's window side in merged tokens (None: no windows)."""
    positions, frames = [], []
    for t, h, w in grid_thw:
        positions.append(frame_positions(h, w, merge).repeat(t, 1))
        frames += [h * w] * t
    layout = VisionLayout(positions=torch.cat(positions).to(device), cu_seqlens=_cumulative(frames, device),
                          max_seqlen=max(frames))
    if window_side is None:
        return layout
    unit = merge * merge
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        index, counts = window_order(t, h // merge, w // merge, window_side)
        order.append(index + offset)
        lengths += [c * unit for c in counts]
        offset += t * (h // merge) * (w // merge)
    window_index = torch.cat(order)
    layout.window_index = window_index.to(device)
    layout.cu_window_seqlens = _cumulative(lengths, device)
    layout.max_window_seqlen = max(lengths)
    # the rotary positions follow the tokens into window order
    layout.positions = layout.positions.view(-1, unit, 2)[layout.window_index].view(-1, 2)
    return layout
