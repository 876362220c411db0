"""Vision-language models assembled from vlmfast ops, loaded from Hugging Face checkpoints.

    from vlmfast.models import CLIP
    model = CLIP.from_pretrained("path/to/clip-vit-base-patch32", dtype=torch.bfloat16)
"""

from vlmfast.models.auto import from_pretrained
from vlmfast.models.blip2 import Blip2, Blip2Config
from vlmfast.models.clip import CLIP
from vlmfast.models.config import CLIPConfig, SigLIPConfig, TextConfig, VisionConfig, ViTConfig
from vlmfast.models.llava import Llava, LlavaConfig
from vlmfast.models.qwen2vl import Qwen2VL, Qwen2VLConfig
from vlmfast.models.siglip import SigLIP
from vlmfast.models.smolvlm import SmolVLM, SmolVLMConfig
from vlmfast.models.vit import ViT

__all__ = ["CLIP", "SigLIP", "ViT", "CLIPConfig", "SigLIPConfig", "ViTConfig", "TextConfig", "VisionConfig",
           "SmolVLM", "SmolVLMConfig", "Qwen2VL", "Qwen2VLConfig", "Llava", "LlavaConfig", "Blip2", "Blip2Config",
           "from_pretrained"]
