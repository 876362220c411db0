"""transformers' LlavaImageProcessor: CLIP's resize / crop / normalise, optionally after padding
the image to a square."""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from vlmfast.processing import config as cfg
from vlmfast.processing.color import to_rgb
from vlmfast.processing.resize_crop import CLIPImageProcessor


class LlavaImageProcessor(CLIPImageProcessor):
    """transformers' LlavaImageProcessor: CLIP's steps, and with do_pad the image is first padded
    to a square (centred, the background the mean colour x 255 truncated) before the resize."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**CLIPImageProcessor.DEFAULTS}

    def _configure(self, values: dict[str, Any]) -> None:
        self.do_pad = cfg.flag("do_pad", values["do_pad"])
        super()._configure({**values, "do_pad": False})

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.do_pad:
            height = width = max(height, width)
        return super().output_size(height, width)

    def _uint8(self, indexed):
        index, image = indexed
        if self.do_pad:
            image = to_rgb(image, f"images[{index}]", convert=self.do_convert_rgb)
            side = max(image.width, image.height)
            if image.width != image.height:
                background = tuple(int(m * 255) for m in self.image_mean)
                square = Image.new("RGB", (side, side), background)
                square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = square
        return super()._uint8((index, image))
