"""SmolVLM / SmolVLM2 / Idefics3: SigLIP-style vision tower, pixel shuffle connector, Llama decoder.

    from vlmfast.models.smolvlm import SmolVLM
    model = SmolVLM.from_pretrained("path/to/SmolVLM2-256M-Video-Instruct", dtype=torch.bfloat16)
    out = model.generate(input_ids, pixel_values, pixel_attention_mask, attention_mask, max_new_tokens=64)
"""

from vlmfast.models.smolvlm.config import SmolVLMConfig, SmolVLMTextConfig, SmolVLMVisionConfig
from vlmfast.models.smolvlm.model import SmolVLM
from vlmfast.models.smolvlm.processor import SmolVLMProcessor

__all__ = ["SmolVLM", "SmolVLMConfig", "SmolVLMProcessor", "SmolVLMTextConfig", "SmolVLMVisionConfig"]
