"""`vlmfast.pipeline("image-text-to-text", model=DIR)`: images + prompts -> generated text, with
the checkpoint's processor (chat template, tiling, tokenizer) and the model's batched generate
(SmolVLM, Qwen2-VL: the family config.json names).

    pipe = vlmfast.pipeline("image-text-to-text", model="path/to/SmolVLM2-256M-Video-Instruct")
    pipe([image], ["What is in this image?"])                      # -> ["A cat on a mat."]
    pipe([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                       {"type": "text", "text": "What is this?"}]}])
    pipe(prompts=["What happens?"], videos=[frames], video_metadata=[{"fps": 30}])  # SmolVLM2 video

As a `generate(images, prompts) -> list[str]` callable it plugs into vlmfast.eval.runners.run_vqa /
run_caption. Greedy by default; the answer is the decoded new tokens without special tokens,
stripped of surrounding whitespace (the chat template ends the prompt with "Assistant:").
"""

from __future__ import annotations

import importlib
import os

import torch

from vlmfast.processing.batch import is_image

TASKS = ("image-text-to-text",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json model_type -> (model class, processor class), as "module:Class"
FAMILIES = {
    "smolvlm": ("vlmfast.models.smolvlm:SmolVLM", "vlmfast.models.smolvlm.processor:SmolVLMProcessor"),
    "idefics3": ("vlmfast.models.smolvlm:SmolVLM", "vlmfast.models.smolvlm.processor:SmolVLMProcessor"),
    "qwen2_vl": ("vlmfast.models.qwen2vl:Qwen2VL", "vlmfast.processing.qwen2vl_processor:Qwen2VLProcessor"),
    "qwen2_5_vl": ("vlmfast.models.qwen2vl:Qwen2VL", "vlmfast.processing.qwen2vl_processor:Qwen2VLProcessor"),
    "llava": ("vlmfast.models.llava:Llava", "vlmfast.processing.llava:LlavaProcessor"),
    "blip-2": ("vlmfast.models.blip2:Blip2", "vlmfast.processing.blip2:Blip2Processor"),
}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _as_image(value, where: str):
    """A PIL image / array, or a path to load."""
    from vlmfast.processing import load_image

    if is_image(value):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_image(value)
    raise TypeError(f"{where}: expected a PIL image, an array or a file path, got {type(value).__name__}")


def _is_conversation(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


class ImageTextToTextPipeline:
    """model: a SmolVLM or Qwen2VL; processor: its processor (SmolVLMProcessor, Qwen2VLProcessor).
    batch_size: prompts per generate call."""

    def __init__(self, model, processor, *, max_new_tokens: int = 64, batch_size: int = 8):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.model, self.processor = model, processor
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    # ------------------------------------------------------------------ inputs -> conversations

    @staticmethod
    def conversation(images: list, prompt: str) -> list[dict]:
        """One user turn: one image slot per image, then the prompt text."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def _from_pairs(self, images, prompts) -> tuple[list[list[dict]], list[list]]:
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts: expected a string or a list of strings")
        if images is None:
            images = [[] for _ in prompts]
        if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
            raise ValueError(f"images: expected one entry (an image, a list of images or None) per prompt "
                             f"({len(prompts)}), got {len(images) if isinstance(images, (list, tuple)) else images!r}")
        samples = []
        for i, entry in enumerate(images):
            entry = [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]
            samples.append([_as_image(image, f"images[{i}]") for image in entry])
        return [self.conversation(s, p) for s, p in zip(samples, prompts)], samples

    @staticmethod
    def _from_conversations(conversations) -> tuple[list[list[dict]], list[list]]:
        """Images are the "image" (or "url" / "path") fields of the {"type": "image"} items, in order."""
        samples = []
        for c, conversation in enumerate(conversations):
            images = []
            for m, message in enumerate(conversation):
                content = message.get("content")
                for k, item in enumerate(content if isinstance(content, list) else []):
                    if isinstance(item, dict) and item.get("type") == "image":
                        value = next((item[key] for key in ("image", "url", "path") if key in item), None)
                        if value is None:
                            raise ValueError(f"messages[{c}][{m}].content[{k}]: an image item needs an 'image' "
                                             "(PIL image or path) field")
                        images.append(_as_image(value, f"messages[{c}][{m}].content[{k}].image"))
            samples.append(images)
        return list(conversations), samples

    # ------------------------------------------------------------------ generation

    def __call__(self, images=None, prompts=None, *, videos=None, video_metadata=None,
                 do_sample_frames: bool | None = None, max_new_tokens: int | None = None,
                 **generate_options) -> list[str]:
        """(images, prompts): images[i] is an image, a path, a list of them or None for prompts[i];
        or one chat conversation / a list of conversations as the first argument;
        or (prompts, videos=): one video per prompt (frames, a uint8 (T, H, W, 3) array or a
        frame folder; see SmolVLMProcessor), video_metadata: None or one dict per video ({"fps"}),
        do_sample_frames: sample the frames at the checkpoint's fps / max_frames (None: its config).
        Returns one generated string per prompt / conversation."""
        if videos is not None:
            return self._videos(prompts, videos, video_metadata, do_sample_frames, max_new_tokens, generate_options)
        if prompts is None and _is_conversation(images):
            conversations, samples = self._from_conversations([images])
        elif prompts is None and isinstance(images, (list, tuple)) and images \
                and all(_is_conversation(c) for c in images):
            conversations, samples = self._from_conversations(images)
        elif prompts is None:
            raise TypeError("prompts: expected prompts with the images, or chat messages as the first argument")
        else:
            conversations, samples = self._from_pairs(images, prompts)
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True)
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            outputs += self.generate_texts(texts[start:start + self.batch_size], samples[start:start + self.batch_size],
                                           max_new_tokens=max_new_tokens, **generate_options)
        return outputs

    def _videos(self, prompts, videos, video_metadata, do_sample_frames, max_new_tokens,
                generate_options) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts: expected a string or a non-empty list of strings with videos=")
        if not isinstance(videos, (list, tuple)) or len(videos) != len(prompts):
            raise ValueError(f"videos: expected a list of one video per prompt ({len(prompts)})")
        if video_metadata is not None and (not isinstance(video_metadata, (list, tuple))
                                           or len(video_metadata) != len(prompts)):
            raise ValueError(f"video_metadata: expected None or one dict per video ({len(prompts)})")
        texts = self.processor.apply_chat_template(
            [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": p}]}] for p in prompts],
            add_generation_prompt=True)
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            batch = slice(start, start + self.batch_size)
            metadata = None if video_metadata is None else list(video_metadata[batch])
            inputs = self.processor(texts[batch], videos=list(videos[batch]), video_metadata=metadata,
                                    do_sample_frames=do_sample_frames)
            outputs += self._generate(inputs, max_new_tokens, generate_options)
        return outputs

    @torch.inference_mode()
    def _generate(self, inputs, max_new_tokens, generate_options) -> list[str]:
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, **generate_options)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens.cpu(), skip_special_tokens=True)]

    @torch.inference_mode()
    def generate_texts(self, texts: list[str], images: list[list], *, max_new_tokens: int | None = None,
                       **generate_options) -> list[str]:
        """Prompt texts (chat template applied, one <image> per image) -> decoded new tokens."""
        inputs = self.processor(texts, images if any(images) else None)
        return self._generate(inputs, max_new_tokens, generate_options)


def pipeline(task: str, model, *, device=None, dtype=None, max_new_tokens: int = 64, batch_size: int = 8):
    """task: "image-text-to-text"; model: a checkpoint folder of a family in FAMILIES (SmolVLM /
    SmolVLM2 / Idefics3, Qwen2-VL / Qwen2.5-VL, LLaVA-1.5, BLIP-2 OPT: weights, config.json, tokenizer.json,
    preprocessor_config.json, chat template). dtype: None (float32), a torch dtype, "float32" /
    "bfloat16" / "float16" or "auto" (bfloat16 where native)."""
    from vlmfast.models import checkpoint

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a checkpoint folder path, got {type(model).__name__}")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
        dtype = DTYPES[dtype]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_type = checkpoint.read_config(model).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model: config.json's model_type {model_type!r} has no image-text-to-text pipeline; "
                         f"supported: {sorted(FAMILIES)}")
    network_class, processor_class = (_load(target) for target in FAMILIES[model_type])
    network = network_class.from_pretrained(model, device=device, dtype=dtype)
    return ImageTextToTextPipeline(network, processor_class.from_pretrained(model),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
