"""transformers' PIL ("slow", use_fast=False) image processors, the parity oracle, built from the
same preprocessor_config.json file as ours."""

from __future__ import annotations

import json
import warnings

import pytest

transformers = pytest.importorskip("transformers")


def write_config(directory, config: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return str(directory)


def hf_processor(name: str, directory: str):
    """transformers' `<name>Pil` class loaded from `directory`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, name + "Pil").from_pretrained(directory)


def hf_run(processor, images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(images, return_tensors="pt", **kwargs)
