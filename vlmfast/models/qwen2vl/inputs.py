"""The vision inputs of a Qwen2-VL call, checked once and carried as one object.

Shapes (transformers' names and layout, as Qwen2VLProcessor returns them):
  pixel_values          float (sum of t*h*w over the images, C * tp * p * p): flattened patches
  image_grid_thw        int (n_images, 3): (t, h, w) in patches per image, in prompt order
  pixel_values_videos   float (sum over the videos, C * tp * p * p)
  video_grid_thw        int (n_videos, 3)
  second_per_grid_ts    (n_videos,) seconds per temporal patch (Qwen2.5-VL; default 1)
  mm_token_type_ids     int (B, L): 0 text, 1 image, 2 video (default: from the image / video
                        token ids of input_ids)
Every inconsistency raises ValueError / TypeError naming the argument and what was expected,
before anything runs.
"""

from dataclasses import dataclass

import torch

from vlmfast.models.prompt_checks import check_prompt
from vlmfast.ops import _checks


@dataclass
class VisionInputs:
    pixel_values: torch.Tensor | None = None
    image_grid_thw: list | None = None  # [(t, h, w)] python ints
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: list | None = None
    second_per_grid_ts: list | None = None
    mm_token_type_ids: torch.Tensor | None = None

    @property
    def has_vision(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None


def _grids(name: str, grid, merge: int) -> list[tuple[int, int, int]]:
    if isinstance(grid, torch.Tensor):
        _checks.integer(name, grid)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"{name}: expected int (n, 3) rows of (t, h, w), got {_checks.shape_of(grid)}")
        rows = [tuple(int(v) for v in row) for row in grid.tolist()]
    elif isinstance(grid, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 3 and all(isinstance(v, int) for v in r) for r in grid):
        rows = [tuple(r) for r in grid]
    else:
        raise TypeError(f"{name}: expected an int tensor (n, 3) of (t, h, w), got {type(grid).__name__}")
    if not rows:
        raise ValueError(f"{name}: expected at least one (t, h, w) row, got none")
    for i, (t, h, w) in enumerate(rows):
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(
                f"{name}: row {i} is (t, h, w) = {(t, h, w)}; expected t >= 1 and h, w positive multiples of "
                f"spatial_merge_size={merge} (patch grids the processor writes)"
            )
    return rows


def _pixels(name: str, pixels, grid_name: str, grids, patch_dim: int) -> None:
    _checks.floating(name, pixels)
    if pixels.dim() != 2 or pixels.shape[1] != patch_dim:
        raise ValueError(
            f"{name}: expected flattened patches (sum of t*h*w, C*T*P*P) = (N, {patch_dim}), got "
            f"{_checks.shape_of(pixels)}"
        )
    total = sum(t * h * w for t, h, w in grids)
    if pixels.shape[0] != total:
        raise ValueError(
            f"{grid_name}: its (t, h, w) rows {grids} hold {total} patches, but {name} has {pixels.shape[0]} rows"
        )


def check(config, input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None,
          pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
          mm_token_type_ids=None) -> VisionInputs:
    """Validates a call of Qwen2VL (config: its Qwen2VLConfig) and returns its VisionInputs."""
    B, L = check_prompt(input_ids, attention_mask)
    vision = config.vision_config
    merge, unit = vision.spatial_merge_size, vision.merge_unit
    out = VisionInputs()
    for kind, pixels_name, grid_name, pixels, grid, token in (
            ("image", "pixel_values", "image_grid_thw", pixel_values, image_grid_thw, config.image_token_id),
            ("video", "pixel_values_videos", "video_grid_thw", pixel_values_videos, video_grid_thw,
             config.video_token_id)):
        if (pixels is None) != (grid is None):
            given, missing = (pixels_name, grid_name) if grid is None else (grid_name, pixels_name)
            raise ValueError(f"{missing}: required with {given} (the (t, h, w) patch grid of each {kind})")
        count = int((input_ids == token).sum())
        if pixels is None:
            if count:
                raise ValueError(f"input_ids: {count} {kind} tokens (id {token}) but no {pixels_name} given")
            continue
        grids = _grids(grid_name, grid, merge)
        _pixels(pixels_name, pixels, grid_name, grids, vision.patch_dim)
        expected = sum(t * h * w for t, h, w in grids) // unit
        if count != expected:
            raise ValueError(
                f"input_ids: expected {expected} {kind} tokens (id {token}; t*h*w/{unit} for each row of "
                f"{grid_name} = {grids}), got {count}"
            )
        if kind == "image":
            out.pixel_values, out.image_grid_thw = pixels, grids
        else:
            out.pixel_values_videos, out.video_grid_thw = pixels, grids
    if second_per_grid_ts is not None:
        if out.video_grid_thw is None:
            raise ValueError("second_per_grid_ts: given without videos")
        seconds = list(second_per_grid_ts)
        if len(seconds) != len(out.video_grid_thw):
            raise ValueError(f"second_per_grid_ts: expected one value per video ({len(out.video_grid_thw)}), "
                             f"got {len(seconds)}")
        out.second_per_grid_ts = seconds
    if mm_token_type_ids is not None:
        _checks.integer("mm_token_type_ids", mm_token_type_ids)
        if tuple(mm_token_type_ids.shape) != (B, L):
            raise ValueError(f"mm_token_type_ids: expected (B, L) = ({B}, {L}) like input_ids, got "
                             f"{_checks.shape_of(mm_token_type_ids)}")
        out.mm_token_type_ids = mm_token_type_ids
    return out


def token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    """mm_token_type_ids from the token ids, as transformers' processor writes them."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types
