"""LLaVA-1.5 configuration (transformers' LlavaConfig, model_type "llava"), read from config.json.

Three parts: a CLIP vision tower (vision_config, "clip_vision_model"), the two-layer projector
(its activation and bias flags here), a Llama decoder (text_config, "llama"). A sub-config
written only in part takes transformers' class defaults for the rest (CLIPVisionConfig's and
LlamaConfig's, which differ from SmolLM2's); a missing one takes LlavaConfig's (ViT-L/14-336, a
Llama-7B decoder). Fields vlmfast does not read are kept for saving (to_hf starts from the dict
the config was read from).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from vlmfast.models.config import VisionConfig
from vlmfast.models.smolvlm.config import SmolVLMTextConfig

VISION_LAYOUTS = ("clip_vision_model",)
SELECT_STRATEGIES = ("default", "full")

# transformers' LlavaConfig defaults for a vision_config that is not given at all (ViT-L/14-336)
DEFAULT_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
                  "num_hidden_layers": 24, "num_attention_heads": 16}
# LlamaConfig's class defaults (a llava config.json names only what differs from them)
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                  "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
# CLIPVisionConfig's class defaults
CLIP_VISION_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def llama_text_config(d: dict | None) -> SmolVLMTextConfig:
    """A Llama text_config dict (LlamaConfig defaults for missing fields) -> SmolVLMTextConfig."""
    return SmolVLMTextConfig.from_hf({"model_type": "llama", **LLAMA_DEFAULTS, **(d or {})})


@dataclass
class LlavaConfig:
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(**{**CLIP_VISION_DEFAULTS,
                                                                                   **DEFAULT_VISION}))
    text_config: SmolVLMTextConfig = field(default_factory=lambda: llama_text_config(None))
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    hf_dict: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"config.json: vision_feature_select_strategy expected one of {SELECT_STRATEGIES}, "
                f"got {self.vision_feature_select_strategy!r}"
            )
        layers = self.vision_feature_layer
        if isinstance(layers, (list, tuple)):
            if not layers:
                raise ValueError("config.json: vision_feature_layer expected an int or a non-empty list of ints")
            self.vision_feature_layer = [int(i) for i in layers]
        n = self.vision_config.num_hidden_layers
        for index in self.feature_layers_raw:
            if isinstance(index, bool) or not isinstance(index, int) or not -(n + 1) <= index <= n:
                raise ValueError(
                    f"config.json: vision_feature_layer expected indices in [-{n + 1}, {n}] (the CLIP tower has "
                    f"{n} layers), got {self.vision_feature_layer!r}"
                )
        from vlmfast.models.layers import ACTIVATIONS

        if self.projector_hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"config.json: projector_hidden_act expected one of {sorted(ACTIVATIONS)}, got {self.projector_hidden_act!r}"
            )

    @property
    def feature_layers_raw(self) -> list:
        layers = self.vision_feature_layer
        return list(layers) if isinstance(layers, (list, tuple)) else [layers]

    @property
    def num_feature_layers(self) -> int:
        return len(self.feature_layers_raw)

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image: the patches, plus the class token with the "full" strategy."""
        rows, cols = self.vision_config.grid
        return rows * cols + int(self.vision_feature_select_strategy == "full")

    @property
    def tied(self) -> bool:
        return bool(self.tie_word_embeddings)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        if d.get("model_type") != "llava":
            raise ValueError(f"config.json: model_type expected 'llava' (LLaVA-1.5 checkpoints), got {d.get('model_type')!r}")
        vision = d.get("vision_config")
        vision = dict(DEFAULT_VISION if vision is None else vision)
        vision_type = vision.get("model_type", "clip_vision_model")
        if vision_type not in VISION_LAYOUTS:
            raise ValueError(f"config.json: vision_config.model_type expected one of {VISION_LAYOUTS}, got {vision_type!r}")
        text = dict(d.get("text_config") or {})
        text_type = text.get("model_type", "llama")
        if text_type != "llama":
            raise ValueError(f"config.json: text_config.model_type expected 'llama', got {text_type!r}")
        text_config = llama_text_config(text)
        # transformers reads the top-level flag, and the text config's where the top level says False
        tied = bool(d.get("tie_word_embeddings", False)) or bool(text.get("tie_word_embeddings", False))
        return cls(
            vision_config=VisionConfig.from_dict({**CLIP_VISION_DEFAULTS, **vision}),
            text_config=text_config,
            image_token_id=int(d.get("image_token_id", d.get("image_token_index", 32000))),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
            tie_word_embeddings=tied,
            hf_dict=copy.deepcopy(d),
        )

    def to_hf(self) -> dict:
        """transformers' LlavaConfig dict: the checkpoint's own while unchanged, else updated."""
        vision = asdict(self.vision_config)
        vision.pop("vision_use_head")
        built = {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "image_seq_length": self.image_seq_len,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_feature_layer": self.vision_feature_layer,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {**vision, "model_type": "clip_vision_model"},
            "text_config": self.text_config.to_hf(),
        }
        if self.hf_dict is None:
            return built
        if LlavaConfig.from_hf(self.hf_dict) == self:
            return copy.deepcopy(self.hf_dict)
        merged = copy.deepcopy(self.hf_dict)
        merged.pop("image_token_id", None)
        for name in ("vision_config", "text_config"):
            part = dict(merged.get(name) or {})
            if name == "text_config":
                part.pop("rope_theta", None)
                part.pop("rope_scaling", None)
            built[name] = {**part, **built[name]}
        return {**merged, **built}
