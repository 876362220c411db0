"""Model configurations as dataclasses, read from and written to Hugging Face config.json dicts.

Only the fields that change the computation are kept; unknown keys of a config.json are ignored
on read, and `to_hf()` writes what transformers needs to rebuild the same model.
"""

from dataclasses import asdict, dataclass, field, fields


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass
class VisionConfig:
    """A ViT tower: (image_size / patch_size)^2 patches of hidden_size, num_hidden_layers blocks."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | tuple = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    vision_use_head: bool = True  # SigLIP's attention-pooling head

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: expected a multiple of num_attention_heads={self.num_attention_heads}, "
                f"got {self.hidden_size}"
            )
        h, w = _pair(self.image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size: expected multiples of patch_size={self.patch_size}, got {self.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        h, w = _pair(self.image_size)
        return h // self.patch_size, w // self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**_known(cls, d))


@dataclass
class TextConfig:
    """A text transformer over token ids of at most max_position_embeddings positions."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    projection_size: int | None = None  # SigLIP's text head width (defaults to hidden_size)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: expected a multiple of num_attention_heads={self.num_attention_heads}, "
                f"got {self.hidden_size}"
            )
        if isinstance(self.eos_token_id, list):  # transformers allows a list; pooling uses the first
            self.eos_token_id = self.eos_token_id[0]

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        return cls(**_known(cls, d))


@dataclass
class CLIPConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPConfig":
        if d.get("model_type") not in (None, "clip"):
            raise ValueError(f"config.json: expected model_type 'clip', got {d.get('model_type')!r}")
        vision = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **d.get("vision_config", {})}
        text = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **d.get("text_config", {})}
        return cls(
            text_config=TextConfig.from_dict(text),
            vision_config=VisionConfig.from_dict(vision),
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
        )

    def to_hf(self) -> dict:
        vision = asdict(self.vision_config)
        vision.pop("vision_use_head")
        text = asdict(self.text_config)
        text.pop("projection_size")
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {**text, "model_type": "clip_text_model"},
            "vision_config": {**vision, "model_type": "clip_vision_model"},
        }


@dataclass
class SigLIPConfig:
    text_config: TextConfig = field(
        default_factory=lambda: TextConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        )
    )
    vision_config: VisionConfig = field(
        default_factory=lambda: VisionConfig(patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    )

    @classmethod
    def from_hf(cls, d: dict) -> "SigLIPConfig":
        if d.get("model_type") not in (None, "siglip"):
            raise ValueError(f"config.json: expected model_type 'siglip', got {d.get('model_type')!r}")
        siglip_defaults = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
        vision = {"patch_size": 16, **siglip_defaults, **d.get("vision_config", {})}
        text = {
            "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "max_position_embeddings": 64, **siglip_defaults, **d.get("text_config", {}),
        }
        return cls(text_config=TextConfig.from_dict(text), vision_config=VisionConfig.from_dict(vision))

    def to_hf(self) -> dict:
        text = asdict(self.text_config)
        if text["projection_size"] is None:
            text["projection_size"] = text["hidden_size"]
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "text_config": {**text, "model_type": "siglip_text_model"},
            "vision_config": {**asdict(self.vision_config), "model_type": "siglip_vision_model"},
        }


@dataclass
class ViTConfig:
    """timm-style classifier: patch embedding, optional class token, blocks, pooling, a head."""

    image_size: int | tuple = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_classes: int = 1000
    global_pool: str = "token"  # "token" (class token) or "avg" (mean over patches)
    class_token: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: expected 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool: 'token' pooling needs class_token=True")
        VisionConfig(**self.vision_kwargs())  # validates sizes

    def vision_kwargs(self) -> dict:
        return dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
        )
