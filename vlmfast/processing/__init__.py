"""Image loading and preprocessing, equal to transformers' PIL image processors.

    from vlmfast.processing import load_images, image_processor_from_pretrained
    processor = image_processor_from_pretrained("path/to/checkpoint")   # reads preprocessor_config.json
    batch = processor(load_images(paths).images)                        # ImageBatch
    model(**batch.model_inputs())

Processors: CLIPImageProcessor, SiglipImageProcessor, SmolVLMImageProcessor (= Idefics3),
Qwen2VLImageProcessor (flattened patches + image_grid_thw; Qwen2VLVideoProcessor for videos). Each
returns float32 pixel_values equal to transformers' (use_fast=False), or with output="uint8" the
resized / cropped / tiled uint8 pixels channels-last for `ops.patch_embed(..., mean=, std=)`, with
`mean, std = processor.patch_embed_normalization()`. SmolVLM prompts: expand_image_tokens(texts,
batch.rows, batch.cols, image_seq_len) writes each <image> out as transformers' SmolVLMProcessor does.
SmolVLM2 videos: SmolVLMVideoProcessor (frames sampled, resized, normalised, padded; see video.py
for the accepted frame formats) and video_prompt.
"""

from vlmfast.processing.auto import image_processor_from_pretrained
from vlmfast.processing.base import ImageProcessor
from vlmfast.processing.batch import ImageBatch
from vlmfast.processing.loading import DEFAULT_MAX_PIXELS, LoadedImages, load_image, load_images
from vlmfast.processing.qwen2vl import Qwen2VLImageProcessor
from vlmfast.processing.qwen2vl_video import Qwen2VLVideoProcessor
from vlmfast.processing.resize_crop import CLIPImageProcessor, SiglipImageProcessor
from vlmfast.processing.smolvlm import Idefics3ImageProcessor, SmolVLMImageProcessor
from vlmfast.processing.smolvlm_prompt import expand_image_tokens, image_prompt, video_prompt
from vlmfast.processing.smolvlm_video import SmolVLMVideoProcessor, VideoBatch
from vlmfast.processing.video import VideoMetadata, read_frames, sample_frame_indices

__all__ = [
    "CLIPImageProcessor",
    "DEFAULT_MAX_PIXELS",
    "Idefics3ImageProcessor",
    "ImageBatch",
    "ImageProcessor",
    "LoadedImages",
    "Qwen2VLImageProcessor",
    "Qwen2VLVideoProcessor",
    "SiglipImageProcessor",
    "SmolVLMImageProcessor",
    "SmolVLMVideoProcessor",
    "VideoBatch",
    "VideoMetadata",
    "expand_image_tokens",
    "image_processor_from_pretrained",
    "image_prompt",
    "load_image",
    "load_images",
    "read_frames",
    "sample_frame_indices",
    "video_prompt",
]
