"""BLIP-2 with an OPT decoder (transformers' Blip2ForConditionalGeneration): image -> ViT ->
Q-Former (num_query_tokens learnt queries attending to the image features) -> language projection
-> written over the <image> tokens -> OPT decoder -> logits.

Shapes (as transformers takes them):
  input_ids       int (B, L), num_query_tokens <image> tokens per image (transformers 5's
                  Blip2Processor puts them first, before the padding and the BOS token)
  pixel_values    float (B, C, H, W), one image per row (a row without image tokens takes none:
                  then N images for the N rows that have them, in order); or uint8 (N, H, W, C)
                  normalised inside the patch embedding with model.image_normalization
  attention_mask  (B, L), 0 on padding (anywhere in the row; None: no padding)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlmfast.models import _ops as shared_ops
from vlmfast.models import checkpoint, weights_io
from vlmfast.models.blip2 import native_decode
from vlmfast.models.blip2.config import Blip2Config
from vlmfast.models.blip2.opt import OPTDecoder
from vlmfast.models.blip2.qformer import QFormer
from vlmfast.models.blip2.vision import VisionModel, check_pixels
from vlmfast.models.causal_vlm import (
    CausalVLM, gemv_applies, read_generation_defaults, write_image_features,
)
from vlmfast.models.smolvlm import _ops
from vlmfast.models.smolvlm.model import read_image_normalization
from vlmfast.models.weights_once import weights_held_once
from vlmfast.processing.resize_crop import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# the Q-Former's text-path feed-forward (BERT's intermediate / output), absent from the model
# unless use_qformer_text_input: some checkpoints carry it anyway, and transformers ignores it
_QFORMER_TEXT_PATH = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
# kept in float32 in a float16 model, as transformers' _keep_in_fp32_modules keeps them (float16
# only: a bfloat16 model has a bfloat16 Q-Former there too); read from the checkpoint as float32,
# never cast down and back up
_FLOAT32_PARTS = ("qformer.", "query_tokens")


def qformer_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The Q-Former's and the queries' dtype in a model of `dtype`."""
    return torch.float32 if dtype == torch.float16 else dtype


class _OPTModel(nn.Module):
    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        self.decoder = OPTDecoder(cfg, device=device, dtype=dtype)


class _OPTForCausalLM(nn.Module):
    """transformers' OPTForCausalLM names: model.decoder.*, lm_head (None when tied)."""

    def __init__(self, cfg, *, tied: bool, device=None, dtype=None):
        super().__init__()
        self.model = _OPTModel(cfg, device=device, dtype=dtype)
        self.lm_head = None
        if not tied:
            self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False, device=device, dtype=dtype)


class Blip2(CausalVLM):
    def __init__(self, config: Blip2Config | None = None, *, device=None, dtype=None):
        super().__init__()
        self.config = config = config or Blip2Config()
        kw = dict(device=device, dtype=dtype)
        q = config.qformer_config
        self.vision_model = VisionModel(config.vision_config, **kw)
        kept = qformer_dtype(dtype)  # float32 in a float16 model, as transformers has it
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size, device=device,
                                                     dtype=kept))
        self.qformer = QFormer(q, device=device, dtype=kept)
        self.language_projection = nn.Linear(q.hidden_size, config.text_config.hidden_size, **kw)
        self.language_model = _OPTForCausalLM(config.text_config, tied=config.tied, **kw)
        # (mean, std) for uint8 pixel_values: the checkpoint's preprocessor_config.json, else BLIP's
        self.image_normalization = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.native_decode = True  # decode steps of <= 32 rows run natively on a CPU (native_decode.py)

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> "Blip2":
        """A directory in Hugging Face layout (config.json + safetensors) of a BLIP-2 OPT
        checkpoint. dtype: the parameters' dtype (None keeps float32; "auto": bfloat16 where
        native), except that a float16 model keeps the Q-Former and its queries in float32, as
        transformers does."""
        dtype = checkpoint.resolve_dtype(dtype, device)
        config = Blip2Config.from_hf(checkpoint.read_config(path))
        with torch.device("meta"):
            model = cls(config)
        # the decoder's q/k/v read into one tensor, each tensor cast as it is read
        kept = _FLOAT32_PARTS if qformer_dtype(dtype) == torch.float32 else ()
        state = weights_io.read_weights(path, fuse=True, dtype=dtype or torch.float32, device=device,
                                        float32_prefixes=kept)
        if config.tied:
            state.pop("language_model.lm_head.weight", None)  # the embeddings are the head
        if not config.qformer_config.use_qformer_text_input:
            state = {k: v for k, v in state.items() if not _QFORMER_TEXT_PATH.match(k)}
        checkpoint.load_state(model, state, device=device, dtype=dtype, float32_prefixes=kept)
        model.generation_defaults = read_generation_defaults(path)
        model.image_normalization = read_image_normalization(path, model.image_normalization)
        return model.eval()

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None, processor_from=None) -> None:
        """A checkpoint directory transformers' Blip2ForConditionalGeneration and Blip2.from_pretrained
        load (the decoder's q/k/v split back; no lm_head.weight when tied); processor_from: a
        checkpoint whose tokenizer / processor / generation files are copied."""
        state = self.state_dict()
        # the vision tower's qkv is transformers' own fused layout: written as it is
        vision = {k: v.detach().clone().contiguous() for k, v in state.items() if k.startswith("vision_model.")}
        rest = checkpoint.native_to_hf({k: v for k, v in state.items() if not k.startswith("vision_model.")})
        checkpoint.write_pretrained(path, self.config.to_hf(), {**vision, **rest},
                                    generation_defaults=self.generation_defaults, max_shard_bytes=max_shard_bytes,
                                    processor_from=processor_from)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """{part: parameters} for vlmfast.train.freeze: vision (the ViT), connector (the queries,
        the Q-Former and the language projection), decoder (OPT's layers, positions and final
        norm), embeddings (the table, and an untied head)."""
        decoder = self.decoder
        return {
            "vision": list(self.vision_model.parameters()),
            "connector": [self.query_tokens, *self.qformer.parameters(), *self.language_projection.parameters()],
            "decoder": [p for name, p in decoder.named_parameters() if not name.startswith("embed_tokens.")],
            "embeddings": list(decoder.embed_tokens.parameters()) + ([] if self.lm_head is None
                                                                      else list(self.lm_head.parameters())),
        }

    # ------------------------------------------------------------------ CausalVLM hooks

    @property
    def decoder(self) -> OPTDecoder:
        return self.language_model.model.decoder

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.model.decoder.embed_tokens

    @property
    def lm_head(self):
        return self.language_model.lm_head

    def cache_layout(self) -> tuple[int, int, int]:
        text = self.config.text_config
        return text.num_hidden_layers, text.num_attention_heads, text.head_dim

    def forward_positions(self, attention_mask, B: int, L: int) -> torch.Tensor:
        # OPT numbers the real tokens 0, 1, ... of each row, skipping padding (which gets -1)
        if attention_mask is None:
            return torch.arange(L, device=self.device).expand(B, L)
        mask = attention_mask.long()
        return mask.cumsum(dim=1) * mask - 1

    def check_images(self, input_ids, pixel_values) -> None:
        if pixel_values is None:
            return
        check_pixels(pixel_values, self.config.vision_config)
        if self.config.image_token_id is None:
            raise ValueError("config.json: image_token_index is missing, so no <image> tokens in input_ids can carry "
                             "pixel_values (transformers 5's BLIP-2 checkpoints set it)")

    # ------------------------------------------------------------------ images

    def _normalization(self, pixel_values):
        return self.image_normalization if pixel_values.dtype == torch.uint8 else (None, None)

    @weights_held_once
    def get_image_features(self, pixel_values) -> torch.Tensor:
        """The vision tower's post-layernormed tokens (B, 1 + N, D_vision) (transformers'
        Blip2Model.get_image_features().last_hidden_state)."""
        check_pixels(pixel_values, self.config.vision_config)
        return self.vision_model(pixel_values, *self._normalization(pixel_values))

    @weights_held_once
    def get_qformer_features(self, pixel_values) -> torch.Tensor:
        """The Q-Former's last hidden states (B, num_query_tokens, D_qformer) in its dtype (float32
        in a float16 model) (transformers' Blip2Model.get_qformer_features)."""
        image_embeds = self.get_image_features(pixel_values)
        return self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds)

    @weights_held_once
    def image_features(self, pixel_values) -> torch.Tensor:
        """(B, num_query_tokens, D_text): the projected query outputs that replace the image tokens."""
        image_embeds = self.get_image_features(pixel_values)
        queries = self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds)
        return shared_ops.linear(queries.to(image_embeds.dtype), self.language_projection)

    def embed(self, input_ids, pixel_values=None) -> torch.Tensor:
        embeds = _ops.embedding(input_ids, self.embed_tokens, weight_used_once=self._untied)
        features = None if pixel_values is None else self.image_features(pixel_values)
        token = self.config.image_token_id
        is_image = input_ids == token if token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        return write_image_features(embeds, is_image, features, token_id=token, per_image=self.config.num_query_tokens)

    # ------------------------------------------------------------------ generation

    def decodes_natively(self, tokens: torch.Tensor, cache) -> bool:
        """Whether a decode step runs natively, the whole OPT stack in one call, or failing that
        its Linear layers through decode_step's GEMV kernel (generate() asks: then no
        oneDNN-packed second copy of the weights is made for bf16)."""
        if self.native_decode and native_decode.will_run(self, tokens, cache):
            return True
        rows = self.embed_tokens.weight.new_empty(tokens.shape[0], self.config.text_config.hidden_size)
        return gemv_applies(rows, self.head_weight)

    def native_steps(self, tokens, positions, cache):
        """generate()'s decode step for one call on `cache`, the native one checked once, or None."""
        return native_decode.sequence_steps(self, tokens, positions, cache) if self.native_decode else None

    def decode_step(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        """CausalVLM.decode_step; on a CPU, a few rows of a bf16 / float32 model run the whole OPT
        stack and the head in one native call (native_decode.py)."""
        if self.native_decode:
            logits = native_decode.decode_step(self, tokens, positions, cache, padded)
            if logits is not None:
                return logits
        return super().decode_step(tokens, positions, cache, padded)

    def default_prompt(self, batch_size: int) -> torch.Tensor:
        """transformers' prompt when generate gets no input_ids: the image tokens, then BOS."""
        if self.config.image_token_id is None or self.config.text_config.bos_token_id is None:
            raise ValueError("input_ids: required (config.json names no image_token_index or bos_token_id to "
                             "build the default prompt from)")
        row = [self.config.image_token_id] * self.config.num_query_tokens + [self.config.text_config.bos_token_id]
        return torch.tensor([row] * batch_size, dtype=torch.long, device=self.device)

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **options) -> torch.Tensor:
        """CausalVLM.generate; input_ids None (captioning): the image tokens and BOS for each image."""
        if input_ids is None:
            if pixel_values is None or attention_mask is not None:
                raise ValueError("input_ids: required unless only pixel_values are given (captioning)")
            input_ids = self.default_prompt(pixel_values.shape[0])
        return super().generate(input_ids, pixel_values, attention_mask, **options)
