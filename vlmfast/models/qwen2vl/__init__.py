"""Qwen2-VL / Qwen2.5-VL: native-resolution vision tower (packed images, 2D rotary, windows),
Qwen2 decoder with multimodal rotary (M-RoPE).

    from vlmfast.models.qwen2vl import Qwen2VL
    model = Qwen2VL.from_pretrained("path/to/Qwen2-VL-2B-Instruct", dtype=torch.bfloat16)
    out = model.generate(input_ids, pixel_values, image_grid_thw, attention_mask, max_new_tokens=64)
"""

from vlmfast.models.qwen2vl.config import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig
from vlmfast.models.qwen2vl.model import Qwen2VL

__all__ = ["Qwen2VL", "Qwen2VLConfig", "Qwen2VLTextConfig", "Qwen2VLVisionConfig"]
