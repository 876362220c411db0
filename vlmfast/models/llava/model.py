"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration): CLIP tower features of
vision_feature_layer -> projector -> written over the <image> tokens -> Llama decoder -> logits.

Shapes (as transformers takes them):
  input_ids       int (B, L), image_seq_len <image> tokens per image (the processor writes them)
  pixel_values    float (N, C, H, W), the N images of the batch in the order of their tokens;
                  or uint8 (N, H, W, C) as decoded (the image processor's output="uint8"),
                  normalised inside the patch embedding with model.image_normalization
  attention_mask  (B, L), 0 on padding (None: no padding)

Module names are transformers 5's (model.vision_tower.vision_model.*, model.multi_modal_projector.*,
model.language_model.*, lm_head.*); checkpoints in either that layout or the older one
(language_model.model.*, vision_tower.*, ...), which the Hub's LLaVA-1.5 checkpoints use and
transformers' save_pretrained still writes, load; saving writes the older one, as transformers does. q/k/v and gate/up are fused on load and
split on save (checkpoint.py, smolvlm.model.fuse_gate_up).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmfast.models import checkpoint, weights_io
from vlmfast.models.causal_vlm import CausalVLM, read_generation_defaults, write_image_features
from vlmfast.models.llava.config import LlavaConfig
from vlmfast.models.llava.vision import Projector, VisionTower, select_features
from vlmfast.models.qwen2vl import native_decode
from vlmfast.models.smolvlm import _ops
from vlmfast.models.smolvlm.decoder import Decoder
from vlmfast.models.smolvlm.model import fuse_gate_up, read_image_normalization, split_gate_up
from vlmfast.models.vit import check_pixels
from vlmfast.models.weights_once import weights_held_once
from vlmfast.processing.resize_crop import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# the layout of LLaVA checkpoints saved before transformers 4.52 -> today's names
_LEGACY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))


def _renamed(state: dict, pairs) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


_TOWER = "model.vision_tower."


def modern_keys(state: dict) -> dict:
    """Checkpoint keys of either layout -> our module names (transformers 5's, with the CLIP
    tower under vision_tower.vision_model as in every LLaVA checkpoint but those transformers 5
    writes, which drop that level)."""
    out = {}
    for key, value in _renamed(state, _LEGACY_PREFIXES).items():
        if key.startswith(_TOWER) and not key.startswith(_TOWER + "vision_model."):
            key = _TOWER + "vision_model." + key[len(_TOWER):]
        out[key] = value
    return out


def legacy_keys(state: dict) -> dict:
    """Our names -> the layout transformers' save_pretrained still writes (and every release reads)."""
    return _renamed(state, [(new, old) for old, new in _LEGACY_PREFIXES])


class _Body(nn.Module):
    """transformers' LlavaModel: the three parts under their checkpoint names."""

    def __init__(self, config: LlavaConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.vision_tower = VisionTower(config.vision_config, **kw)
        self.multi_modal_projector = Projector(config, **kw)
        self.language_model = Decoder(config.text_config, **kw)


class Llava(CausalVLM):
    def __init__(self, config: LlavaConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        self.config = config = config or LlavaConfig()
        self.model = _Body(config, device=device, dtype=dtype)
        text = config.text_config
        self.lm_head = None
        if not config.tied:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False, device=device, dtype=dtype)
        # (mean, std) for uint8 pixel_values: the checkpoint's preprocessor_config.json, else CLIP's
        self.image_normalization = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.native_decode = True  # decode_step runs natively on a CPU where it can (below)

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> "Llava":
        """A directory in Hugging Face layout (config.json + safetensors) of a LLaVA-1.5 checkpoint.
        dtype: the parameters' dtype (None keeps float32; "auto": bfloat16 where the device
        computes it natively)."""
        dtype = checkpoint.resolve_dtype(dtype, device)
        config = LlavaConfig.from_hf(checkpoint.read_config(path))
        with torch.device("meta"):
            model = cls(config)
        # each tensor cast to dtype as it is read: a float32 checkpoint is never held whole
        state = fuse_gate_up(modern_keys(weights_io.read_weights(path, fuse=True, dtype=dtype or torch.float32,
                                                                 device=device)))
        if config.tied:
            state.pop("lm_head.weight", None)  # the embeddings are the head
        checkpoint.load_state(model, state, device=device, dtype=dtype)
        model.generation_defaults = read_generation_defaults(path)
        model.image_normalization = read_image_normalization(path, model.image_normalization)
        return model.eval()

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None, processor_from=None) -> None:
        """A checkpoint directory transformers' LlavaForConditionalGeneration and Llava.from_pretrained
        load: config.json, the weights under the keys transformers' save_pretrained writes (q/k/v
        and gate/up split back, no lm_head.weight when tied), sharded above max_shard_bytes; processor_from: a checkpoint
        whose tokenizer / processor / generation files are copied."""
        state = legacy_keys(split_gate_up(checkpoint.native_to_hf(self.state_dict())))
        checkpoint.write_pretrained(path, self.config.to_hf(), state, generation_defaults=self.generation_defaults,
                                    max_shard_bytes=max_shard_bytes, processor_from=processor_from)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """{part: parameters} for vlmfast.train.freeze: vision (the CLIP tower), connector (the
        projector), decoder (layers and final norm), embeddings (the table, and an untied head)."""
        text = self.model.language_model
        return {
            "vision": list(self.model.vision_tower.parameters()),
            "connector": list(self.model.multi_modal_projector.parameters()),
            "decoder": list(text.layers.parameters()) + list(text.norm.parameters()),
            "embeddings": list(text.embed_tokens.parameters()) + ([] if self.lm_head is None
                                                                   else list(self.lm_head.parameters())),
        }

    # ------------------------------------------------------------------ native CPU decode

    def decodes_natively(self, tokens: torch.Tensor, cache) -> bool:
        """Whether decode_step will take the native CPU path for these rows (generate() asks)."""
        return self.native_decode and native_decode.will_run(self, tokens, cache)

    def native_steps(self, tokens, positions, cache):
        """generate()'s decode step for one call on `cache`, the native one checked once, or None."""
        return native_decode.sequence_steps(self, tokens, positions, cache) if self.native_decode else None

    def decode_step(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        """CausalVLM.decode_step; on a CPU, a few rows of a bf16 / float32 model run the whole
        Llama stack and the head in one native call (smolvlm/fast_decode.py: the decoder is
        SmolVLM's, under model.language_model as in Qwen2-VL, whose view of it is reused)."""
        if self.native_decode:
            logits = native_decode.decode_step(self, tokens, positions, cache, padded)
            if logits is not None:
                return logits
        return super().decode_step(tokens, positions, cache, padded)

    # ------------------------------------------------------------------ CausalVLM hooks

    @property
    def decoder(self) -> Decoder:
        return self.model.language_model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def cache_layout(self) -> tuple[int, int, int]:
        text = self.config.text_config
        return text.num_hidden_layers, text.num_key_value_heads, text.head_dim

    def forward_positions(self, attention_mask, B: int, L: int) -> torch.Tensor:
        # transformers' Llama forward numbers positions 0..L-1 whatever the padding (generate does not)
        return torch.arange(L, device=self.device).expand(B, L)

    def check_images(self, input_ids, pixel_values) -> None:
        if pixel_values is not None:
            check_pixels(pixel_values, self.config.vision_config)

    @weights_held_once
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float or (N, H, W, C) uint8 -> (N, image_seq_len, D_text)."""
        mean = std = None
        if pixel_values.dtype == torch.uint8:
            mean, std = self.image_normalization
        tower = self.model.vision_tower.vision_model
        hidden = tower.forward_tokens(pixel_values, mean, std, hidden_states=self.config.feature_layers_raw)
        return self.model.multi_modal_projector(select_features(hidden, self.config.vision_feature_select_strategy))

    def embed(self, input_ids, pixel_values=None) -> torch.Tensor:
        """Token embeddings (B, L, D) with the image features written over the image tokens."""
        # untied, the table's only use is here: an optimizer in the backward may update it in slices
        embeds = _ops.embedding(input_ids, self.embed_tokens, weight_used_once=self._untied)
        features = None if pixel_values is None else self.image_features(pixel_values)
        is_image = input_ids == self.config.image_token_id
        return write_image_features(embeds, is_image, features, token_id=self.config.image_token_id,
                                    per_image=self.config.image_seq_len)
