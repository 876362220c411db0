"""Modules built on vlmfast.ops."""

from vlmfast.nn.rotary import Rotary2D, RotaryMixed2D

__all__ = ["Rotary2D", "RotaryMixed2D"]
