"""LLaVA-1.5: a CLIP tower, a two-layer projector and a Llama decoder (see model.py)."""

from vlmfast.models.llava.config import LlavaConfig
from vlmfast.models.llava.model import Llava

__all__ = ["Llava", "LlavaConfig"]
