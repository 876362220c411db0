"""Modules built on vlmfast.ops."""

from vlmfast.nn.attention import Attention
from vlmfast.nn.losses import ClipLoss, SigLipLoss
from vlmfast.nn.patch_embed import PatchEmbed
from vlmfast.nn.rotary import Rotary2D, RotaryMixed2D

__all__ = ["Attention", "PatchEmbed", "Rotary2D", "RotaryMixed2D"]
__all__ += ["ClipLoss", "SigLipLoss"]
from vlmfast.nn.cross_entropy import LinearCrossEntropy  # noqa: E402
__all__ += ["LinearCrossEntropy"]
