"""Qwen2-VL / Qwen2.5-VL video processor: frames (optionally sampled) resized by smart_resize,
normalised, and cut into temporal patches of temporal_patch_size frames.

The steps of transformers' Qwen2VLVideoProcessor, for the same config and frames:
  1. optional sampling (do_sample_frames): num_frames rounded to a multiple of the temporal
     patch, or fps frames per second of the video (metadata fps needed) within [min_frames,
     max_frames]; indices arange(0, total, total / n) truncated;
  2. resize: smart_resize of the frame size into [min_pixels, max_pixels] (optionally capped per
     frame by a whole-video budget: cap_pixels_per_frame / max_video_tokens);
  3. rescale + normalise in float32 as transformers' fused path, (v - mean / r) / (std / r);
  4. the last frame repeated up to a multiple of temporal_patch_size, then patches laid out as
     the image processor's (qwen2vl.patchify), temporal patch by temporal patch:
     video_grid_thw (frames / tp, h, w).
Resizing is Pillow's filter (bicubic) on each uint8 frame; transformers resizes videos with
torchvision (not a vlmfast dependency), whose antialiased bicubic rounds a few pixel values
differently, so frames that need resizing can differ from transformers' by a level or so;
frames already at their smart_resize size pass unchanged in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vlmfast.processing import geometry
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.qwen2vl import Qwen2VLImageProcessor, patchify, pixel_limits, smart_resize
from vlmfast.processing.smolvlm_video import normalization_table
from vlmfast.processing.video import VideoMetadata, read_frames, read_metadata

DEFAULT_FPS = 24  # what transformers assumes of a video without metadata


@dataclass
class Qwen2VLVideoBatch:
    """pixel_values_videos float32 (sum of t * h * w, C * tp * p * p); video_grid_thw int64
    (V, 3); metadata: per video after sampling (frames_indices: the frames kept)."""

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    metadata: list[VideoMetadata]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": self.pixel_values_videos, "video_grid_thw": self.video_grid_thw}


def sampled_fps(meta: VideoMetadata) -> float:
    """Frames per second of the frames kept (transformers' VideoMetadata.sampled_fps)."""
    if meta.fps is None:
        return DEFAULT_FPS
    return len(meta.frames_indices) / meta.total_num_frames * meta.fps


class Qwen2VLVideoProcessor(ImageProcessor):
    """Defaults are transformers' Qwen2VLVideoProcessor's (128 to 768 merged tokens of pixels per
    frame, 4 to 768 frames when sampling)."""

    # the image processor's, but for the pixels per frame; then the sampling keys
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **Qwen2VLImageProcessor.DEFAULTS,
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "do_sample_frames": False,
        "fps": None,
        "num_frames": None,
        "min_frames": 4,
        "max_frames": 768,
        "cap_pixels_per_frame": None,
        "max_video_tokens": 128000,
    }

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._table = normalization_table(self.do_rescale, self.rescale_factor, self.do_normalize,
                                          self.image_mean, self.image_std)

    def _configure(self, values: dict[str, Any]) -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames",
                    "max_video_tokens"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive int, got {value!r}")
            setattr(self, key, value)
        self.min_pixels, self.max_pixels = pixel_limits(values)
        self.do_sample_frames = bool(values["do_sample_frames"])
        self.fps, self.num_frames = values["fps"], values["num_frames"]
        self.cap_pixels_per_frame = bool(values["cap_pixels_per_frame"])

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def sample_indices(self, meta: VideoMetadata, *, num_frames=None, fps=None, where: str = "videos") -> torch.Tensor:
        """Indices of the frames to keep (transformers' Qwen2VLVideoProcessor.sample_frames):
        num_frames when given, else fps, else every frame."""
        tp, total = self.temporal_patch_size, meta.total_num_frames
        if num_frames is not None:
            num_frames = round(num_frames / tp) * tp
        elif fps is not None:
            if meta.fps is None:
                raise ValueError(f"{where}: fps sampling needs the video's fps in its video_metadata")
            max_frames = math.floor(min(self.max_frames, total) / tp) * tp
            num_frames = min(max(total / meta.fps * fps, self.min_frames), max_frames, total)
            num_frames = math.floor(num_frames / tp) * tp
        if num_frames is None:
            return torch.arange(total)
        if num_frames < 1 or num_frames > total:
            raise ValueError(f"{where}: cannot sample {num_frames} frames (multiples of temporal_patch_size={tp}) "
                             f"from {total}")
        return torch.arange(0, total, total / num_frames).int()

    def frame_size(self, height: int, width: int, frames: int, where: str = "videos") -> tuple[int, int]:
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(f"{where}: {height} x {width} frames; with do_resize false both must be multiples "
                                 f"of patch_size * merge_size = {self.factor}")
            return height, width
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:  # an even share of the whole video's pixel budget, at least 1.05 x min
            total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // frames), int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels, name=where)

    def _video(self, frames: np.ndarray, where: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 (T, H, W, 3) -> (patches, (t, h, w) grid)."""
        count, height, width = frames.shape[:3]
        size = self.frame_size(height, width, count, where)
        tp = self.temporal_patch_size
        padded = count + (-count % tp)
        values = np.empty((padded, 3, *size), dtype=np.float32)
        for t, frame in enumerate(frames):
            if size != (height, width):
                frame = np.asarray(geometry.resize(Image.fromarray(frame), size, self.resample))
            self._to_float(frame, values[t])
        values[count:] = values[count - 1]  # the last frame repeated up to a whole temporal patch
        grid = (padded // tp, size[0] // self.patch_size, size[1] // self.patch_size)
        return patchify(values, self.patch_size, self.merge_size, tp), grid

    def __call__(self, videos: list, video_metadata: list | None = None, *, do_sample_frames: bool | None = None,
                 fps: float | None = None, num_frames: int | None = None) -> Qwen2VLVideoBatch:
        """videos: a list of videos (vlmfast.processing.video: PIL frames, uint8 (T, H, W, 3), a
        frame folder); video_metadata: None or one dict per video ({"fps", ...}).
        do_sample_frames / fps / num_frames: override the config's sampling."""
        if not isinstance(videos, (list, tuple)) or not videos:
            raise TypeError("videos: expected a non-empty list of videos")
        if video_metadata is not None and (not isinstance(video_metadata, (list, tuple))
                                           or len(video_metadata) != len(videos)):
            raise ValueError(f"video_metadata: expected one dict per video ({len(videos)}), got {video_metadata!r}")
        if fps is not None and num_frames is not None:
            raise ValueError("num_frames, fps: give one of the two")
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        num_frames = self.num_frames if num_frames is None else num_frames
        fps = self.fps if fps is None else fps
        patches, grids, metadata = [], [], []
        for v, video in enumerate(videos):
            frames = read_frames(video, f"videos[{v}]")
            meta = read_metadata(None if video_metadata is None else video_metadata[v], len(frames),
                                 f"video_metadata[{v}]")
            if sample:
                keep = self.sample_indices(meta, num_frames=num_frames, fps=fps, where=f"videos[{v}]")
                frames = frames[keep.numpy()]
                meta.frames_indices = [meta.frames_indices[i] for i in keep.tolist()]
            video_patches, grid = self._video(frames, f"videos[{v}]")
            patches.append(video_patches)
            grids.append(grid)
            metadata.append(meta)
        pixel_values = torch.from_numpy(np.ascontiguousarray(np.concatenate(patches)))
        return Qwen2VLVideoBatch(pixel_values, torch.tensor(grids, dtype=torch.int64), metadata)
