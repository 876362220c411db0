"""Qwen2-VL / Qwen2.5-VL configurations, read from a Hugging Face config.json dict.

Two architectures under one reader:
  qwen2_vl    vision: LayerNorm + MLP (quick_gelu) blocks of width embed_dim, merger to hidden_size
  qwen2_5_vl  vision: RMSNorm + SwiGLU blocks of width hidden_size, window attention outside
              fullatt_block_indexes, merger (RMSNorm) to out_hidden_size
Both decoders are Qwen2 (GQA, qkv bias, RMSNorm, SwiGLU) with multimodal rotary (M-RoPE): the
rotary frequencies split into mrope_section (temporal, height, width) parts.

Two config.json layouts: transformers 5 nests the decoder in "text_config"; the hub checkpoints
(and transformers 4) keep its fields at the top level, rope under "rope_scaling" {"type":
"mrope", "mrope_section"} and "rope_theta". Only fields that change the computation are kept;
the dict read is kept too, so that saving writes it back (to_hf).
"""

import copy
from dataclasses import asdict, dataclass, field, fields

ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VISION_TYPES = {"qwen2_vl": "qwen2_vl_vision", "qwen2_5_vl": "qwen2_5_vl_vision"}
TEXT_TYPES = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text"}
# the Qwen2-VL decoder fields transformers reads from the top level of an older (flat) config.json
_FLAT_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                     "use_sliding_window", "sliding_window", "max_window_layers", "rope_parameters",
                     "rope_scaling", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id",
                     "tie_word_embeddings", "attention_dropout")


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _side(name: str, value) -> int:
    """patch_size / temporal_patch_size: an int, or a list of equal ints as some configs write it."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}: expected one size, got {value}")
        value = value[0]
    return int(value)


def _rope_theta(d: dict, default: float) -> float:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return float(rope.get("rope_theta", d.get("rope_theta", default)))


@dataclass
class Qwen2VLVisionConfig:
    """The vision tower. width: the blocks' width (embed_dim in Qwen2-VL, hidden_size in 2.5);
    out_size: the merger's output (the decoder's width)."""

    version: str = "qwen2_vl"  # or "qwen2_5_vl"
    depth: int = 32
    width: int = 1280
    out_size: int = 3584
    num_heads: int = 16
    mlp_hidden: int = 5120  # Qwen2-VL: embed_dim * mlp_ratio; 2.5: intermediate_size
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    # Qwen2.5-VL only
    window_size: int = 112
    fullatt_block_indexes: tuple = ()
    tokens_per_second: float = 4.0
    mlp_ratio: float = 4.0  # as read (Qwen2-VL), kept for to_hf

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        if self.width % self.num_heads:
            raise ValueError(f"vision_config: width {self.width} is not a multiple of num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision_config: head dim {self.head_dim} must be a multiple of 4 (2D rotary halves "
                             "rotate by row and column)")
        if self.version == "qwen2_5_vl":
            unit = self.spatial_merge_size * self.patch_size
            if self.window_size % unit or self.window_size < unit:
                raise ValueError(f"vision_config.window_size: expected a positive multiple of spatial_merge_size * "
                                 f"patch_size = {unit}, got {self.window_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch of pixel_values: C * temporal_patch_size * patch_size^2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict, version: str) -> "Qwen2VLVisionConfig":
        common = dict(
            version=version, depth=int(d.get("depth", 32)), num_heads=int(d.get("num_heads", 16)),
            in_channels=int(d.get("in_channels", 3)), patch_size=_side("patch_size", d.get("patch_size", 14)),
            temporal_patch_size=_side("temporal_patch_size", d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)), rope_theta=_rope_theta(d, 10000.0),
        )
        if version == "qwen2_vl":
            width = int(d.get("embed_dim", 1280))
            ratio = d.get("mlp_ratio", 4)
            return cls(width=width, out_size=int(d.get("hidden_size", 3584)), mlp_hidden=int(width * ratio),
                       mlp_ratio=ratio, hidden_act=d.get("hidden_act", "quick_gelu"), **common)
        return cls(width=int(d.get("hidden_size", 3584)), out_size=int(d.get("out_hidden_size", 3584)),
                   mlp_hidden=int(d.get("intermediate_size", 3420)), hidden_act=d.get("hidden_act", "silu"),
                   window_size=int(d.get("window_size", 112)),
                   fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))),
                   tokens_per_second=float(d.get("tokens_per_second", 4)), **common)

    def to_hf(self) -> dict:
        rope = {"rope_theta": self.rope_theta, "rope_type": "axial"}
        common = dict(depth=self.depth, num_heads=self.num_heads, in_channels=self.in_channels,
                      patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                      spatial_merge_size=self.spatial_merge_size, hidden_act=self.hidden_act, rope_parameters=rope,
                      model_type=VISION_TYPES[self.version])
        if self.version == "qwen2_vl":
            return {**common, "embed_dim": self.width, "hidden_size": self.out_size, "mlp_ratio": self.mlp_ratio}
        return {**common, "hidden_size": self.width, "out_hidden_size": self.out_size,
                "intermediate_size": self.mlp_hidden, "window_size": self.window_size,
                "fullatt_block_indexes": list(self.fullatt_block_indexes),
                "tokens_per_second": self.tokens_per_second}


@dataclass
class Qwen2VLTextConfig:
    """The Qwen2 decoder, in the field names vlmfast's Llama decoder (smolvlm/decoder.py) reads."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple = (16, 24, 24)
    rope_type: str = "default"  # M-RoPE's own frequencies; no scaling
    rope_factor: float = 1.0
    attention_bias: bool = True  # q, k, v carry a bias (o_proj does not)
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"text_config.hidden_size: expected a multiple of num_attention_heads="
                                 f"{self.num_attention_heads}, got {self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config.num_key_value_heads: expected a divisor of num_attention_heads="
                             f"{self.num_attention_heads}, got {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act: expected 'silu' (SwiGLU), got {self.hidden_act!r}")
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"text_config.rope_parameters.mrope_section: expected 3 parts (temporal, height, width) "
                             f"summing to head_dim / 2 = {self.head_dim // 2}, got {list(self.mrope_section)}")
        self.eos_token_id = _first(self.eos_token_id)

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2VLTextConfig":
        if d.get("use_sliding_window"):
            raise ValueError("text_config.use_sliding_window: sliding-window attention is not supported "
                             "(no released Qwen2-VL checkpoint uses it)")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"text_config.rope_parameters: rope_type expected 'default' (M-RoPE), got {kind!r}")
        kwargs = _known(cls, d)
        # transformers' Qwen2-VL attention is hidden_size / heads wide whatever a head_dim key says
        for dropped in ("rope_type", "rope_factor", "mrope_section", "rope_theta", "attention_bias", "mlp_bias",
                        "head_dim"):
            kwargs.pop(dropped, None)
        return cls(**kwargs, rope_theta=_rope_theta(d, 1000000.0),
                   mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))))

    def to_hf(self, version: str) -> dict:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("rope_theta", "mrope_section", "rope_type", "rope_factor", "attention_bias", "mlp_bias",
                          "head_dim")}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, "mrope_section": list(self.mrope_section)}
        return {**d, "rope_parameters": rope, "model_type": TEXT_TYPES[version]}


@dataclass
class Qwen2VLConfig:
    vision_config: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    text_config: Qwen2VLTextConfig = field(default_factory=Qwen2VLTextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    tie_word_embeddings: bool = False
    model_type: str = "qwen2_vl"
    # the config.json dict this config was read from (None when built directly): to_hf keeps its
    # fields, those vlmfast does not read included
    hf_dict: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"config.json: model_type expected one of {sorted(ARCHITECTURES)}, "
                             f"got {self.model_type!r}")
        if self.vision_config.version != self.model_type:
            raise ValueError(f"vision_config: a {self.vision_config.version} tower in a {self.model_type} model")
        if self.vision_config.out_size != self.text_config.hidden_size:
            raise ValueError(f"vision_config: the merger's output {self.vision_config.out_size} must equal "
                             f"text_config.hidden_size={self.text_config.hidden_size}")

    @property
    def version(self) -> str:
        return self.model_type

    @property
    def tied(self) -> bool:
        return bool(self.tie_word_embeddings)

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2VLConfig":
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"config.json: model_type expected one of {sorted(ARCHITECTURES)} (Qwen2-VL, "
                             f"Qwen2.5-VL checkpoints), got {model_type!r}")
        if d.get("text_config"):
            text = dict(d["text_config"])
        else:  # the older flat layout: the decoder's fields at the top level
            text = {k: d[k] for k in _FLAT_TEXT_FIELDS if k in d}
        # transformers 4 saves put tie_word_embeddings in text_config; 5 reads either
        tied = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(
            vision_config=Qwen2VLVisionConfig.from_hf(dict(d.get("vision_config") or {}), model_type),
            text_config=Qwen2VLTextConfig.from_hf(text),
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            tie_word_embeddings=tied, model_type=model_type, hf_dict=copy.deepcopy(d),
        )

    def to_hf(self) -> dict:
        """The config.json dict transformers' Qwen2VLForConditionalGeneration (or Qwen2.5-VL's)
        reads: the dict read, unchanged while the values are; else transformers 5's layout."""
        if self.hf_dict is not None and Qwen2VLConfig.from_hf(self.hf_dict) == self:
            return copy.deepcopy(self.hf_dict)
        built = {
            "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": self.vision_config.to_hf(), "text_config": self.text_config.to_hf(self.model_type),
        }
        if self.hf_dict is None:
            return built
        kept = {k: v for k, v in copy.deepcopy(self.hf_dict).items() if k not in _FLAT_TEXT_FIELDS}
        for name in ("vision_config", "text_config"):
            part = dict(kept.get(name) or {})
            part.pop("rope_scaling", None)
            part.pop("rope_theta", None)
            built[name] = {**part, **built[name]}
        return {**kept, **built}
