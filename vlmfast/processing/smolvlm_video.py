"""SmolVLM2 video processor: frames sampled, resized to square tiles, normalised, padded.

The steps of transformers' SmolVLMVideoProcessor, for the same config and frames:
  1. optional sampling (do_sample_frames, video.sample_frame_indices: fps and max_frames from the
     config's "video_sampling");
  2. resize: long edge -> the video size's longest_edge (short edge by the aspect ratio, made
     even), then to max_image_size x max_image_size (frames are never split: one tile each);
  3. rescale + normalise in float32 as transformers' fused torchvision path computes it,
     (v - mean / rescale_factor) / (std / rescale_factor);
  4. pad: every video to the most frames of the batch with all-zero frames; their pixel mask
     is 1 on the video's frame size, as transformers writes it (the model drops all-zero
     frames), except with output="uint8" where 0 is how the model tells them.
Resizing is Pillow's filter named by "resample" (Lanczos for SmolVLM2) on each uint8 frame;
transformers resizes with torchvision (not a vlmfast dependency), whose Lanczos rounds a few
pixel values differently, so frames that need resizing can differ from transformers' by a
level or so; frames already max_image_size square pass unchanged in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vlmfast.processing import config as cfg
from vlmfast.processing import geometry
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.batch import check_output
from vlmfast.processing.smolvlm import HALF
from vlmfast.processing.video import VideoMetadata, read_frames, read_metadata, sample_frame_indices

MAX_VIDEO_SIZE = 4096  # transformers' cap on the longest edge of a resized frame


@dataclass
class VideoBatch:
    """pixel_values: float32 (V, T, 3, S, S) or uint8 (V, T, S, S, 3) with output="uint8", T the
    most frames of a video, all-zero padding frames; pixel_attention_mask: int64 (V, T, S, S)
    (padding frames: see step 4 of the module docstring);
    metadata: per video, its VideoMetadata after sampling (frames_indices: the frames kept)."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    metadata: list[VideoMetadata]


def normalization_table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean, std) -> np.ndarray:
    """float32 (256, C): each uint8 value through transformers' video rescale + normalise, which
    folds the rescale into mean and std (torch float32 arithmetic, torchvision's normalize)."""
    values = torch.arange(256, dtype=torch.float32)[:, None].repeat(1, len(mean))
    if do_rescale and do_normalize:
        mean = torch.tensor(mean) * (1.0 / rescale_factor)
        std = torch.tensor(std) * (1.0 / rescale_factor)
        values = values.sub_(mean).div_(std)
    elif do_normalize:
        values = values.sub_(torch.tensor(mean, dtype=torch.float32)).div_(torch.tensor(std, dtype=torch.float32))
    elif do_rescale:
        values = values * rescale_factor
    return values.numpy()


class SmolVLMVideoProcessor(ImageProcessor):
    """Defaults are transformers' SmolVLMVideoProcessor's; max_frames / fps (the config's
    "video_sampling") default to SmolVLM2's 64 frames at 1 per second. A config with both
    "size" and "video_sampling" resizes to "size" first, as transformers does."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": 4 * 364},
        "resample": 1,  # PIL.Image.Resampling.LANCZOS
        "max_image_size": {"longest_edge": 364},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": HALF,
        "image_std": HALF,
        "do_pad": True,
        "do_sample_frames": False,
        "video_sampling": None,
    }

    def _configure(self, values: dict[str, Any]) -> None:
        sampling = values["video_sampling"] or {}
        if not isinstance(sampling, dict):
            raise ValueError(f"video_sampling: expected a dict with fps, max_frames, video_size, got {sampling!r}")
        size = values["size"]
        if "video_size" in sampling and self._config_size is None:
            size = sampling["video_size"]
        self.size = cfg.size_dict("size", size, default_to_square=True,
                                  allowed=(frozenset({"longest_edge"}), frozenset({"height", "width"})))
        max_size = values["max_image_size"]
        if isinstance(max_size, int) and not isinstance(max_size, bool):
            max_size = {"longest_edge": max_size}
        self.max_image_size = cfg.size_dict("max_image_size", max_size, default_to_square=True,
                                            allowed=(frozenset({"longest_edge"}),))
        self.do_pad = cfg.flag("do_pad", values["do_pad"])
        self.do_sample_frames = cfg.flag("do_sample_frames", values["do_sample_frames"])
        self.max_frames = int(sampling.get("max_frames", 64))
        self.fps = float(sampling.get("fps", 1))
        if self.max_frames < 1 or self.fps <= 0:
            raise ValueError(f"video_sampling: expected max_frames >= 1 and fps > 0, got {sampling}")

    def __init__(self, config=None, **overrides):
        # transformers lets a "size" of the file or the call override video_sampling's video_size
        self._config_size = (overrides.get("size") or (config or {}).get("size"))
        super().__init__(config, **overrides)
        self._table = normalization_table(self.do_rescale, self.rescale_factor, self.do_normalize,
                                          self.image_mean, self.image_std)

    @property
    def tile_size(self) -> int:
        return self.max_image_size["longest_edge"]

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        if "longest_edge" in self.size:
            return geometry.longest_edge_even_size(height, width, min(MAX_VIDEO_SIZE, self.size["longest_edge"]))
        return self.size["height"], self.size["width"]

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (S, S, 3)."""
        if not self.do_resize:
            return frame
        image = Image.fromarray(frame)
        image = geometry.resize(image, self._resize_size(image.height, image.width), self.resample)
        tile = self.tile_size
        return np.asarray(geometry.resize(image, (tile, tile), self.resample))

    def __call__(self, videos: list, video_metadata: list | None = None, *, do_sample_frames: bool | None = None,
                 max_frames: int | None = None, fps: float | None = None, output: str = "float32",
                 max_workers: int | None = None) -> VideoBatch:
        """videos: a list of V videos (video.read_frames); video_metadata: None or one dict per
        video (video.read_metadata). do_sample_frames / max_frames / fps: override the config.
        Returns a VideoBatch."""
        check_output(output)
        if not isinstance(videos, (list, tuple)) or not videos:
            raise TypeError("videos: expected a non-empty list of videos")
        if video_metadata is not None and (not isinstance(video_metadata, (list, tuple))
                                           or len(video_metadata) != len(videos)):
            raise ValueError(f"video_metadata: expected one dict per video ({len(videos)}), got {video_metadata!r}")
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        clips, metadata = [], []
        for v, video in enumerate(videos):
            frames = read_frames(video, f"videos[{v}]")
            meta = read_metadata(None if video_metadata is None else video_metadata[v], len(frames),
                                 f"video_metadata[{v}]")
            if sample:
                if meta.frames_indices != list(range(len(frames))) or meta.total_num_frames != len(frames):
                    raise ValueError(f"video_metadata[{v}]: the frames are already picked from a longer video "
                                     "(frames_indices); sample them there or pass do_sample_frames=False")
                keep = sample_frame_indices(meta, max_frames=max_frames or self.max_frames, fps=fps or self.fps)
                frames = frames[keep]
                meta.frames_indices = [meta.frames_indices[i] for i in keep]
            clips.append(frames)
            metadata.append(meta)

        items = [frame for frames in clips for frame in frames]
        resized = iter(self._map(self._frame, items, max_workers))
        clips = [[next(resized) for _ in frames] for frames in clips]
        if not self.do_pad and (len({len(c) for c in clips}) > 1 or len({f.shape for c in clips for f in c}) > 1):
            raise ValueError(f"videos: different frame counts {[len(c) for c in clips]} or sizes and do_pad is false")
        pixel_values, mask = self._pad_frames(clips, output)
        if output != "uint8":
            for v, frames in enumerate(clips):
                # as transformers: float output marks the padding frames' first h x w (the last real
                # frame's size) as real pixels
                h, w = frames[-1].shape[:2]
                mask[v, len(frames):, :h, :w] = 1
        return VideoBatch(torch.from_numpy(pixel_values), torch.from_numpy(mask), metadata)
