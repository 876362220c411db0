"""BLIP-2 with an OPT decoder: a ViT, the Q-Former's learnt queries, a projection, OPT (model.py)."""

from vlmfast.models.blip2.config import Blip2Config
from vlmfast.models.blip2.model import Blip2

__all__ = ["Blip2", "Blip2Config"]
