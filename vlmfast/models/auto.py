"""`vlmfast.models.from_pretrained(path)`: the model class a checkpoint's config.json names.

    model = vlmfast.models.from_pretrained("path/to/Qwen2-VL-2B-Instruct", dtype=torch.bfloat16)

FAMILIES maps config.json's model_type to "module:Class"; a family registers with one line.
Classes are imported on first use, so that naming every family costs no import.
"""

from __future__ import annotations

import importlib

from vlmfast.models import checkpoint

FAMILIES = {
    "clip": "vlmfast.models.clip:CLIP",
    "siglip": "vlmfast.models.siglip:SigLIP",
    "smolvlm": "vlmfast.models.smolvlm:SmolVLM",
    "idefics3": "vlmfast.models.smolvlm:SmolVLM",
    "qwen2_vl": "vlmfast.models.qwen2vl:Qwen2VL",
    "qwen2_5_vl": "vlmfast.models.qwen2vl:Qwen2VL",
    "llava": "vlmfast.models.llava:Llava",
    "blip-2": "vlmfast.models.blip2:Blip2",
}


def model_class(model_type: str) -> type:
    """The class registered for a config.json model_type (ValueError naming the supported ones)."""
    target = FAMILIES.get(model_type)
    if target is None:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def from_pretrained(path, **kwargs):
    """The model of the checkpoint directory `path`, by its config.json model_type, loaded with
    that class's from_pretrained(path, **kwargs) (device=, dtype=)."""
    model_type = checkpoint.read_config(path).get("model_type")
    return model_class(model_type).from_pretrained(path, **kwargs)
