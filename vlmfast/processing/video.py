"""Videos as frames: reading the `videos` argument, their metadata, and frame sampling.

vlmfast decodes no video file (no av / decord / opencv dependency): a video is its frames,
  - a list of PIL images or of uint8 (H, W, 3) arrays / tensors,
  - a uint8 (T, H, W, 3) numpy array or torch tensor,
  - a directory of frame images (sorted by file name),
with, as transformers takes it, a metadata dict {"fps", "total_num_frames", "duration",
"frames_indices"} (all optional; fps is what the prompt's timestamps need).

Sampling is transformers' SmolVLMVideoProcessor.sample_frames: min(round(fps * duration),
max_frames) indices spread evenly (np.linspace, truncated, deduplicated) over the frames, the first
and last second skipped when the video is long enough; timestamps are index / video fps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
METADATA_KEYS = ("fps", "total_num_frames", "duration", "frames_indices", "height", "width", "video_backend")


@dataclass
class VideoMetadata:
    """What the prompt needs about one video. frames_indices: the indices (in the original
    video) of the frames kept; fps: the original frame rate (None: unknown)."""

    total_num_frames: int
    fps: float | None = None
    duration: float | None = None
    frames_indices: list[int] | None = None

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each kept frame: index / fps."""
        return [i / self.fps for i in self.frames_indices]


def _frame_array(frame, where: str) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"{where}: expected a PIL image or a uint8 (H, W, 3) array, got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{where}: expected a uint8 (H, W, 3) frame, got {frame.dtype} {tuple(frame.shape)}")
    return frame


def read_frames(video, where: str = "videos[0]") -> np.ndarray:
    """One video (see the module docstring) -> uint8 (T, H, W, 3), T >= 1, all frames one size."""
    if isinstance(video, (str, os.PathLike)):
        folder = Path(video)
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: expected a directory of frame images, got {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"{where}: no frame images ({', '.join(FRAME_SUFFIXES)}) in {folder}")
        frames = []
        for file in files:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        video = frames
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3 or video.shape[0] == 0:
            raise ValueError(f"{where}: expected uint8 frames (T, H, W, 3) with T >= 1, got {video.dtype} "
                             f"{tuple(video.shape)}")
        return video
    if not isinstance(video, (list, tuple)) or not video:
        raise TypeError(f"{where}: expected a non-empty list of frames (PIL images or uint8 (H, W, 3) arrays), a "
                        f"uint8 (T, H, W, 3) array or a directory of frames, got {type(video).__name__}")
    frames = [_frame_array(f, f"{where}[{t}]") for t, f in enumerate(video)]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{where}: expected frames of one size (T, H, W, 3), got sizes {sorted(sizes)}")
    return np.stack(frames)


def is_video(value) -> bool:
    """Whether `value` is one video rather than a list of videos."""
    if isinstance(value, (str, os.PathLike)):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 4
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        return isinstance(first, Image.Image) or (isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 3)
    return False


def video_list(videos) -> list:
    """`videos` as a flat list of videos (one video alone, or a list of them)."""
    if is_video(videos):
        return [videos]
    if isinstance(videos, (list, tuple)) and videos:
        return list(videos)
    raise TypeError("videos: expected a video (a list of frames, a uint8 (T, H, W, 3) array or a frame directory) "
                    f"or a non-empty list of videos, got {type(videos).__name__}")


def read_metadata(value, total_num_frames: int, where: str) -> VideoMetadata:
    """A video's metadata dict (or None) -> VideoMetadata. frames_indices (the positions of the
    given frames in the original video) defaults to every frame; with it, total_num_frames and
    duration may be the original video's."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected a dict with keys among {METADATA_KEYS}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected keys among {METADATA_KEYS}")
    fps = value.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise ValueError(f"{where}: fps expected a positive number, got {fps!r}")
    indices = value.get("frames_indices")
    total = value.get("total_num_frames")
    if indices is None:
        if total is not None and total != total_num_frames:
            raise ValueError(f"{where}: total_num_frames {total} but the video has {total_num_frames} frames "
                             "(frames picked from a longer video need their frames_indices)")
        indices = list(range(total_num_frames))
    else:
        indices = [int(i) for i in indices]
        if len(indices) != total_num_frames:
            raise ValueError(f"{where}: frames_indices has {len(indices)} entries for {total_num_frames} frames")
        total = max(total or 0, max(indices) + 1)
    duration = value.get("duration")
    return VideoMetadata(total or total_num_frames, None if fps is None else float(fps),
                         None if duration is None else float(duration), indices)


def sample_frame_indices(metadata: VideoMetadata, *, max_frames: int, fps: float, skip_secs: float = 1) -> np.ndarray:
    """Indices of the frames to keep, as transformers' SmolVLMVideoProcessor.sample_frames.
    Needs metadata.fps; a missing duration is total_num_frames / fps."""
    if metadata.fps is None:
        raise ValueError("video_metadata: fps is needed to sample frames (do_sample_frames=True); "
                         "pass {'fps': ...} per video")
    total = metadata.total_num_frames
    duration = metadata.duration if metadata.duration is not None else total / metadata.fps
    wanted = max(min(int(round(fps * duration)), max_frames), 1)
    start, end = 0, total - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * fps:
        start, end = int(skip_secs * metadata.fps), int(total - skip_secs * metadata.fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int))
