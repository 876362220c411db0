"""SmolVLM / SmolVLM2 / Idefics3 configurations, read from a Hugging Face config.json dict.

The three layouts share one architecture (a SigLIP-style vision tower over variable-size tiles,
pixel shuffle + one projection, a Llama decoder); they differ only in names and defaults:
  smolvlm   (SmolVLM and SmolVLM2; model_type "smolvlm", vision "smolvlm_vision")
  idefics3  (model_type "idefics3", vision "idefics3_vision")
Only fields that change the computation are kept; anything else in config.json is ignored when
loading, and kept when saving (to_hf starts from the dict the config was read from).
"""

import copy
from dataclasses import asdict, dataclass, field, fields

# model_type -> its vision tower's model_type; the decoder is a Llama in every supported layout.
LAYOUTS = {"smolvlm": "smolvlm_vision", "idefics3": "idefics3_vision"}
TEXT_LAYOUTS = ("llama",)
ARCHITECTURES = {"smolvlm": "SmolVLMForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}
ROPE_TYPES = ("default", "linear")


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


@dataclass
class SmolVLMVisionConfig:
    """SigLIP-style tower: square tiles of image_size, (image_size / patch_size)^2 patches."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if isinstance(self.image_size, (list, tuple)):
            if len(set(self.image_size)) != 1:
                raise ValueError(f"vision_config.image_size: expected square tiles, got {self.image_size}")
            self.image_size = int(self.image_size[0])
        if isinstance(self.patch_size, (list, tuple)):
            self.patch_size = int(self.patch_size[0])
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size: expected a multiple of num_attention_heads="
                f"{self.num_attention_heads}, got {self.hidden_size}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size: expected a multiple of patch_size={self.patch_size}, got {self.image_size}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_hf(self, model_type: str) -> dict:
        return {**asdict(self), "model_type": model_type}


@dataclass
class SmolVLMTextConfig:
    """A Llama / SmolLM2 decoder: GQA, RMSNorm, SwiGLU, 1D rotary."""

    vocab_size: int = 49280
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # "linear" scaling divides positions by it
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"text_config.hidden_size: expected a multiple of num_attention_heads="
                    f"{self.num_attention_heads}, got {self.hidden_size}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config.num_key_value_heads: expected a divisor of num_attention_heads="
                f"{self.num_attention_heads}, got {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"text_config.head_dim: expected an even size for rotary pairs, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act: expected 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"text_config.rope_parameters: rope_type expected one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        self.eos_token_id = _first(self.eos_token_id)

    @classmethod
    def from_hf(cls, d: dict) -> "SmolVLMTextConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in TEXT_LAYOUTS:
            raise ValueError(f"config.json: text_config.model_type expected one of {TEXT_LAYOUTS}, got {model_type!r}")
        # transformers 5 writes rope_parameters; older files rope_theta (+ rope_scaling)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kwargs = _known(cls, d)
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kwargs["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_factor"] = float(rope.get("factor", 1.0))
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """transformers' LlamaConfig dict (rope in transformers 5's rope_parameters)."""
        d = asdict(self)
        rope = {"rope_type": d.pop("rope_type"), "rope_theta": d.pop("rope_theta")}
        factor = d.pop("rope_factor")
        if rope["rope_type"] != "default":
            rope["factor"] = factor
        return {**d, "rope_parameters": rope, "model_type": "llama"}


@dataclass
class SmolVLMConfig:
    """The whole model. image_seq_len: the tokens one tile becomes after pixel shuffle."""

    vision_config: SmolVLMVisionConfig = field(default_factory=SmolVLMVisionConfig)
    text_config: SmolVLMTextConfig = field(default_factory=SmolVLMTextConfig)
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    model_type: str = "smolvlm"
    # the config.json dict this config was read from (None when built directly): to_hf keeps
    # its fields, those vlmfast does not read included
    hf_dict: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in LAYOUTS:
            raise ValueError(
                f"config.json: model_type expected one of {sorted(LAYOUTS)} (SmolVLM, SmolVLM2, Idefics3), "
                f"got {self.model_type!r}"
            )
        side = self.vision_config.patches_per_side
        if side % self.scale_factor:
            raise ValueError(
                f"scale_factor: expected a divisor of the {side} patches per tile side "
                f"(image_size / patch_size), got {self.scale_factor}"
            )

    @property
    def image_seq_len(self) -> int:
        return (self.vision_config.patches_per_side // self.scale_factor) ** 2

    @property
    def tied(self) -> bool:
        """transformers ties lm_head to the embeddings when the top-level flag says so."""
        return bool(self.tie_word_embeddings)

    @classmethod
    def from_hf(cls, d: dict) -> "SmolVLMConfig":
        model_type = d.get("model_type")
        if model_type not in LAYOUTS:
            raise ValueError(
                f"config.json: model_type expected one of {sorted(LAYOUTS)} (SmolVLM, SmolVLM2, Idefics3 "
                f"checkpoints), got {model_type!r}"
            )
        vision = dict(d.get("vision_config") or {})
        vision_type = vision.get("model_type", LAYOUTS[model_type])
        if vision_type not in LAYOUTS.values():
            raise ValueError(
                f"config.json: vision_config.model_type expected one of {sorted(LAYOUTS.values())}, got {vision_type!r}"
            )
        return cls(
            vision_config=SmolVLMVisionConfig(**_known(SmolVLMVisionConfig, vision)),
            text_config=SmolVLMTextConfig.from_hf(dict(d.get("text_config") or {})),
            scale_factor=int(d.get("scale_factor", 2)),
            image_token_id=int(d.get("image_token_id", 128257)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=model_type,
            hf_dict=copy.deepcopy(d),
        )

    def to_hf(self) -> dict:
        """The config.json dict transformers' SmolVLMForConditionalGeneration (Idefics3's for
        that layout) reads. A config read from a checkpoint gives that checkpoint's dict back
        unchanged while its values are the same; a changed one has them updated in place."""
        built = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id,
            "scale_factor": self.scale_factor,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": self.vision_config.to_hf(LAYOUTS[self.model_type]),
            "text_config": self.text_config.to_hf(),
        }
        if self.hf_dict is None:
            return built
        if SmolVLMConfig.from_hf(self.hf_dict) == self:
            return copy.deepcopy(self.hf_dict)
        merged = copy.deepcopy(self.hf_dict)
        for name in ("vision_config", "text_config"):
            part = dict(merged.get(name) or {})
            if name == "text_config":  # older rope fields would contradict rope_parameters
                part.pop("rope_theta", None)
                part.pop("rope_scaling", None)
            built[name] = {**part, **built[name]}
        return {**merged, **built}
