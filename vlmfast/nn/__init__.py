"""Modules built on vlmfast.ops."""

from vlmfast.nn.attention import Attention
from vlmfast.nn.cross_entropy import LinearCrossEntropy
from vlmfast.nn.losses import ClipLoss, SigLipLoss
from vlmfast.nn.patch_embed import PatchEmbed
from vlmfast.nn.rotary import Rotary2D, RotaryMixed2D

__all__ = ["Attention", "ClipLoss", "LinearCrossEntropy", "PatchEmbed", "Rotary2D", "RotaryMixed2D", "SigLipLoss"]
