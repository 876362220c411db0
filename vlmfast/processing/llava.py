"""LLaVA-1.5 processing: CLIP image processing (optionally padded to a square first, transformers'
LlavaImageProcessor do_pad: llava_image.py), the chat template, and each <image> of a prompt written out as one
<image> token per image feature, as transformers' LlavaProcessor does.

    processor = LlavaProcessor.from_pretrained("path/to/llava-1.5-7b-hf")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)                    # "USER: <image>\\nWhat is this? ASSISTANT:"
    inputs = processor([text], [image])               # input_ids, attention_mask, pixel_values
    out = model.generate(**inputs, max_new_tokens=32)
"""

from __future__ import annotations

import os
from pathlib import Path

from vlmfast.processing.auto import image_processor_if_any
from vlmfast.processing.batch import is_image
from vlmfast.processing.llava_image import LlavaImageProcessor  # noqa: F401  (re-exported)
from vlmfast.processing.prompt_processor import PromptProcessor
from vlmfast.processing.tokenizer_files import read_json

# The LLaVA-1.5 conversation format ("USER: <image>\n<question> ASSISTANT: <answer> ..."): per
# message the role in capitals (none for a system message), its images first ("<image>\n" each),
# then its texts each followed by a space; "ASSISTANT:" to prompt a reply. Used when a checkpoint
# ships no template of its own.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _flat_images(images) -> list:
    """One image, a list of images, or a list of per-sample lists -> the images in prompt order."""
    if is_image(images):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected an image, a list of images or a list of lists, got {type(images).__name__}")
    flat = []
    for i, item in enumerate(images):
        for j, image in enumerate(item if isinstance(item, (list, tuple)) else [item]):
            if not is_image(image):
                raise TypeError(f"images[{i}]: expected a PIL image or a uint8 array (H, W, C), got "
                                f"{type(image).__name__}" + (f" at [{j}]" if isinstance(item, (list, tuple)) else ""))
            flat.append(image)
    return flat


class LlavaProcessor(PromptProcessor):
    """texts (+ images) -> Llava.forward / generate inputs; ids -> text.

    patch_size, vision_feature_select_strategy, num_additional_image_tokens: transformers'
    LlavaProcessor's (an image of H x W pixels takes (H / p) * (W / p) + additional tokens, one
    fewer with the "default" strategy, which drops the class token)."""

    def __init__(self, tokenizer, image_processor=None, *, patch_size: int = 14,
                 vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 1, **kwargs):
        super().__init__(tokenizer, image_processor, **kwargs)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: expected 'default' or 'full', "
                             f"got {vision_feature_select_strategy!r}")
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "left") -> "LlavaProcessor":
        """A checkpoint folder: tokenizer.json, tokenizer_config.json, the chat template (LLaVA-1.5's
        when it has none), preprocessor_config.json, processor_config.json (patch_size,
        vision_feature_select_strategy, num_additional_image_tokens; config.json's values and
        the class token where it names none)."""
        path = Path(path)
        text = cls.read_text_side(path)
        text["chat_template"] = text["chat_template"] or LLAVA_CHAT_TEMPLATE
        settings = read_json(path / "processor_config.json")
        model = read_json(path / "config.json")
        patch = settings.get("patch_size") or (model.get("vision_config") or {}).get("patch_size", 14)
        strategy = (settings.get("vision_feature_select_strategy")
                    or model.get("vision_feature_select_strategy", "default"))
        additional = settings.get("num_additional_image_tokens", 1)
        return cls(padding_side=padding_side, image_processor=image_processor_if_any(path), patch_size=patch,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=additional, **text)

    def tokens_per_image(self, height: int, width: int) -> int:
        """<image> tokens for a processed image of height x width pixels."""
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - int(self.vision_feature_select_strategy == "default")

    def __call__(self, text, images=None, *, output: str = "float32") -> dict:
        """text: a prompt or a list of B prompts, one `<image>` per image; images: None, one image,
        a list of images (in the order of the <image> of all prompts), or one list per prompt.
        output="uint8": pixel_values uint8 (N, H, W, 3) for the fused patch embedding.

        Returns dict: input_ids int64 (B, L) padded on padding_side, attention_mask int64 (B, L),
        pixel_values float32 (N, 3, H, W) (only with images)."""
        texts = self.texts(text)
        counts = [t.count(self.image_token) for t in texts]
        out = {}
        if images is None:
            if any(counts):
                raise ValueError(f"images: text has {counts} {self.image_token} token(s) per prompt but no images "
                                 "were given")
        else:
            flat = _flat_images(images)
            if len(flat) != sum(counts):
                raise ValueError(f"images: expected one image per {self.image_token} of the text ({counts} per "
                                 f"prompt, {sum(counts)} in all), got {len(flat)}")
            if self.image_processor is None:
                raise ValueError("images: this processor has no image processor (no preprocessor_config.json)")
            batch = self.image_processor(flat, output=output)
            pixel_values = batch.pixel_values
            H, W = pixel_values.shape[1:3] if output == "uint8" else pixel_values.shape[2:4]
            expanded = self.image_token * self.tokens_per_image(H, W)
            texts = [t.replace(self.image_token, expanded) for t in texts]
            out["pixel_values"] = pixel_values
        input_ids, attention_mask = self.pad(self.encode(texts))
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}
