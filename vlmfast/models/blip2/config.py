"""BLIP-2 configuration (transformers' Blip2Config, model_type "blip-2") with an OPT decoder.

Three sub-configs: vision_config (Blip2VisionConfig: a ViT with q/v biases), qformer_config
(Blip2QFormerConfig: BERT-style post-norm layers, cross-attention every cross_attention_frequency
layers), text_config (OPTConfig). Missing fields take transformers' class defaults (those of
Salesforce/blip2-opt-2.7b for the first two, OPTConfig's for the decoder). Fields vlmfast does
not read are kept for saving.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _single(name: str, value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: {name} expected a square size, got {value}")
        value = value[0]
    return int(value)


@dataclass
class Blip2VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self):
        self.image_size = _single("vision_config.image_size", self.image_size)
        self.patch_size = _single("vision_config.patch_size", self.patch_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config.json: vision_config.hidden_size expected a multiple of num_attention_heads="
                             f"{self.num_attention_heads}, got {self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"config.json: vision_config.image_size expected a multiple of patch_size="
                             f"{self.patch_size}, got {self.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def to_hf(self) -> dict:
        return {**asdict(self), "model_type": "blip_2_vision_model"}


@dataclass
class Blip2QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config.json: qformer_config.hidden_size expected a multiple of num_attention_heads="
                             f"{self.num_attention_heads}, got {self.hidden_size}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"config.json: qformer_config.cross_attention_frequency expected a positive int, "
                             f"got {self.cross_attention_frequency}")

    def to_hf(self) -> dict:
        return {**asdict(self), "model_type": "blip_2_qformer"}


@dataclass
class OPTConfig:
    """transformers' OPTConfig fields that change the computation (its defaults: OPT-125m)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config.json: text_config.hidden_size expected a multiple of num_attention_heads="
                             f"{self.num_attention_heads}, got {self.hidden_size}")
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        from vlmfast.models.layers import ACTIVATIONS

        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"config.json: text_config.activation_function expected one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def final_layer_norm(self) -> bool:
        """Whether the decoder ends with a LayerNorm (pre-norm layouts, unless removed)."""
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, d: dict) -> "OPTConfig":
        model_type = d.get("model_type", "opt")
        if model_type != "opt":
            raise ValueError(f"config.json: text_config.model_type expected 'opt' (BLIP-2 OPT checkpoints), "
                             f"got {model_type!r}")
        values = _known(cls, d)
        if "_remove_final_layer_norm" in d:
            values["remove_final_layer_norm"] = bool(d["_remove_final_layer_norm"])
        return cls(**values)

    def to_hf(self) -> dict:
        d = asdict(self)
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        return {**d, "model_type": "opt"}


@dataclass
class Blip2Config:
    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    text_config: OPTConfig = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_token_id: int | None = None
    hf_dict: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # transformers sets it from the tower whatever the file says
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.text_config.word_embed_proj_dim != self.text_config.hidden_size:
            # the projected query outputs (hidden_size wide) replace token embeddings (word_embed_proj_dim)
            raise ValueError(f"config.json: text_config.word_embed_proj_dim ({self.text_config.word_embed_proj_dim}) "
                             f"must equal hidden_size ({self.text_config.hidden_size}) for BLIP-2")

    @property
    def image_seq_len(self) -> int:
        return self.num_query_tokens

    @property
    def tied(self) -> bool:
        return bool(self.text_config.tie_word_embeddings)

    @classmethod
    def from_hf(cls, d: dict) -> "Blip2Config":
        if d.get("model_type") != "blip-2":
            raise ValueError(f"config.json: model_type expected 'blip-2' (BLIP-2 checkpoints), got {d.get('model_type')!r}")
        vision = dict(d.get("vision_config") or {})
        qformer = dict(d.get("qformer_config") or {})
        token = d.get("image_token_id", d.get("image_token_index"))
        return cls(
            vision_config=Blip2VisionConfig(**_known(Blip2VisionConfig, vision)),
            qformer_config=Blip2QFormerConfig(**_known(Blip2QFormerConfig, qformer)),
            text_config=OPTConfig.from_hf(dict(d.get("text_config") or {})),
            num_query_tokens=int(d.get("num_query_tokens", 32)),
            image_token_id=None if token is None else int(token),
            hf_dict=copy.deepcopy(d),
        )

    def to_hf(self) -> dict:
        built = {
            "architectures": ["Blip2ForConditionalGeneration"],
            "model_type": "blip-2",
            "num_query_tokens": self.num_query_tokens,
            "image_token_index": self.image_token_id,
            "vision_config": self.vision_config.to_hf(),
            "qformer_config": self.qformer_config.to_hf(),
            "text_config": self.text_config.to_hf(),
        }
        if self.hf_dict is None:
            return built
        if Blip2Config.from_hf(self.hf_dict) == self:
            return copy.deepcopy(self.hf_dict)
        merged = copy.deepcopy(self.hf_dict)
        merged.pop("image_token_id", None)
        for name in ("vision_config", "qformer_config", "text_config"):
            built[name] = {**dict(merged.get(name) or {}), **built[name]}
        return {**merged, **built}
