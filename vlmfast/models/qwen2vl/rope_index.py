"""M-RoPE positions: (temporal, height, width) of every prompt token, as transformers'
get_rope_index computes them.

Per row, over the real tokens only (attention_mask; padding gets 0): a run of text tokens counts
on from the current position p (all three equal: p, p+1, ...); a run of image / video tokens is
the next grid of its kind (images and videos each consumed in order across the batch), its
tokens placed at (p + t * interval, p + i, p + j) over the merged grid (t, i, j), after which p
advances by the larger merged grid side. interval is 1 for images and Qwen2-VL videos;
Qwen2.5-VL videos space frames by tokens_per_second * second_per_grid_ts seconds.
"""

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """(kind, start, end) of each run of equal values."""
    runs, start = [], 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            runs.append((types[start], start, i))
            start = i
    return runs


def grid_positions(start: int, grid: tuple[int, int, int], merge: int, interval=1) -> torch.Tensor:
    """int64 (3, t * h/m * w/m): the positions of one image / video's merged tokens."""
    t, h, w = grid
    temporal = (torch.arange(t) * interval).long() + start
    rows = torch.arange(h // merge) + start
    cols = torch.arange(w // merge) + start
    return torch.stack(torch.meshgrid(temporal, rows, cols, indexing="ij")).reshape(3, -1)


def rope_index(mm_token_type_ids: torch.Tensor, image_grids: list, video_grids: list, merge: int, *,
               attention_mask: torch.Tensor | None = None, video_intervals: list | None = None) -> torch.Tensor:
    """mm_token_type_ids int (B, L): 0 text, 1 image, 2 video. image_grids / video_grids: the
    (t, h, w) patch grids in order. video_intervals: per video the temporal spacing (default 1).
    Returns int64 (3, B, L) on mm_token_type_ids' device. ValueError (naming input_ids) when a
    run of image or video tokens does not have its grid's t * h * w / m^2 tokens, or there are
    more runs than grids."""
    B, L = mm_token_type_ids.shape
    types = mm_token_type_ids.cpu()
    valid = None if attention_mask is None else attention_mask.cpu().bool()
    positions = torch.zeros(3, B, L, dtype=torch.long)
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    intervals = iter(video_intervals if video_intervals is not None else [1] * len(video_grids))
    names = {IMAGE: ("image", "image_grid_thw"), VIDEO: ("video", "video_grid_thw")}
    for b in range(B):
        row = types[b] if valid is None else types[b][valid[b]]
        pieces, current = [], 0
        for kind, start, end in _runs(row.tolist()):
            if kind == TEXT:
                pieces.append(torch.arange(current, current + end - start).expand(3, -1))
                current += end - start
                continue
            what, source = names.get(kind, (None, None))
            if what is None:
                raise ValueError(f"mm_token_type_ids: expected 0 (text), 1 (image) or 2 (video), got {kind}")
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"input_ids: row {b} has more runs of {what} tokens than {source} has entries")
            tokens = grid[0] * grid[1] * grid[2] // merge**2
            if end - start != tokens:
                raise ValueError(
                    f"input_ids: row {b} has a run of {end - start} {what} tokens where its {source} entry "
                    f"{tuple(grid)} needs t*h*w/{merge**2} = {tokens}"
                )
            interval = next(intervals) if kind == VIDEO else 1
            pieces.append(grid_positions(current, grid, merge, interval))
            current += max(grid[1], grid[2]) // merge
        if pieces:
            filled = torch.cat(pieces, dim=1)
            if valid is None:
                positions[:, b] = filled
            else:
                positions[:, b, valid[b]] = filled
    return positions.to(mm_token_type_ids.device)
