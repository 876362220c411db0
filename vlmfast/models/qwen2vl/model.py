"""Qwen2-VL and Qwen2.5-VL: a native-resolution vision tower (packed images, 2D rotary, windows in
2.5) -> features written over the image / video tokens -> Qwen2 decoder with M-RoPE -> logits.

Inputs are transformers' (see inputs.py for the shapes):
    logits = model(input_ids, pixel_values, image_grid_thw, attention_mask)
    out = model.generate(input_ids, pixel_values, image_grid_thw, attention_mask, max_new_tokens=64)
    loss = model.loss(input_ids, labels, pixel_values, image_grid_thw, attention_mask)

Positions follow transformers: forward without images or videos numbers tokens 0..L-1 whatever
the padding (as Qwen2VLForConditionalGeneration.forward does); with them, and always in
generation, M-RoPE positions over the real tokens (rope_index.py). A decode step continues each
row from its last prompt position (+1 per component: a prompt ending in text has three equal
components, and the step is then plain 1D rotary, which the native CPU decode runs).
"""

import torch
from torch import nn

from vlmfast.generation.cache import StaticKVCache
from vlmfast.models import checkpoint, weights_io
from vlmfast.models.layers import set_gradient_checkpointing
from vlmfast.models.qwen2vl import inputs as _inputs
from vlmfast.models.qwen2vl import native_decode, weights
from vlmfast.models.qwen2vl.config import Qwen2VLConfig
from vlmfast.models.qwen2vl.decoder import Qwen2Decoder
from vlmfast.models.qwen2vl.rope_index import rope_index
from vlmfast.models.qwen2vl.vision import VisionTower
from vlmfast.models.smolvlm import _ops
from vlmfast.models.smolvlm.model import (
    causal_padding_mask, read_generation_defaults, with_generation_defaults,
)
from vlmfast.models.prompt_checks import check_labels
from vlmfast.models.token_head import TokenTableHead
from vlmfast.models.weights_once import weights_held_once


class MRopeKVCache(StaticKVCache):
    """A StaticKVCache plus each row's M-RoPE offsets: offsets (3, B) int64, the (t, h, w)
    positions of a decode step minus the position generate() passes; uniform: all zero (then
    a step is 1D rotary)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offsets = torch.zeros(3, self.batch_size, dtype=torch.long, device=self.device)
        self.uniform = True

    def reset(self) -> None:
        super().reset()
        self.offsets.zero_()
        self.uniform = True


class _Body(nn.Module):
    """transformers' Qwen2VLModel: the tower and the decoder under their module names."""

    def __init__(self, cfg: Qwen2VLConfig, *, device=None, dtype=None):
        super().__init__()
        self.visual = VisionTower(cfg.vision_config, device=device, dtype=dtype)
        self.language_model = Qwen2Decoder(cfg.text_config, device=device, dtype=dtype)


class Qwen2VL(TokenTableHead, nn.Module):
    def __init__(self, config: Qwen2VLConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = _Body(config, device=device, dtype=dtype)
        text = config.text_config
        self.lm_head = None
        if not config.tied:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False, device=device, dtype=dtype)
        self.generation_defaults = {}  # eos / pad ids of the checkpoint's generation_config.json
        self.auto_pack = True  # generate() packs bf16 CPU weights on first use (pack_weights)
        self.native_decode = True  # decode steps of <= 32 rows run natively on a CPU (native_decode.py)
        # inference keeps no packed copy of the weights in vlmfast's GEMM: held once (weights_once.py)
        self.cache_packed_weights = False

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> "Qwen2VL":
        """A Qwen2-VL / Qwen2.5-VL checkpoint directory (config.json + safetensors, sharded too).
        dtype: the parameters' dtype (None: float32; "auto": bfloat16 where the device computes
        it natively)."""
        dtype = checkpoint.resolve_dtype(dtype, device)
        config = Qwen2VLConfig.from_hf(checkpoint.read_config(path))
        with torch.device("meta"):
            model = cls(config)
        # read without a memory map, q/k/v and gate/up straight into their fused tensors, each
        # tensor cast to dtype as it is read (a float32 checkpoint is never held whole)
        state = weights.to_native(weights_io.read_weights(path, fuse=True, dtype=dtype or torch.float32,
                                                          device=device))
        if config.tied:
            state.pop("lm_head.weight", None)  # the embeddings are the head
        checkpoint.load_state(model, state, device=device, dtype=dtype)
        model.generation_defaults = read_generation_defaults(path)
        return model.eval()

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None, processor_from=None) -> None:
        """Writes a checkpoint directory transformers' Qwen2VLForConditionalGeneration (or
        Qwen2.5-VL's) and Qwen2VL.from_pretrained load: config.json (a loaded checkpoint's own,
        unread fields kept), the weights in the hub layout transformers writes (sharded with an
        index above max_shard_bytes, each file atomically); processor_from: a checkpoint folder
        whose tokenizer / processor / generation files are copied."""
        text = self.config.text_config
        state = weights.to_checkpoint(self.state_dict(), text.num_attention_heads * text.head_dim,
                                      text.num_key_value_heads * text.head_dim)
        checkpoint.write_pretrained(path, self.config.to_hf(), state, generation_defaults=self.generation_defaults,
                                    max_shard_bytes=max_shard_bytes, processor_from=processor_from)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """{part: parameters} for vlmfast.train.freeze: vision = the patch embedding and blocks,
        connector = the patch merger, decoder = the layers and final norm, embeddings = the token
        table and an untied lm_head."""
        visual, text = self.model.visual, self.model.language_model
        embeddings = list(text.embed_tokens.parameters())
        if self.lm_head is not None:
            embeddings += list(self.lm_head.parameters())
        return {"vision": list(visual.patch_embed.parameters()) + list(visual.blocks.parameters()),
                "connector": list(visual.merger.parameters()),
                "decoder": list(text.layers.parameters()) + list(text.norm.parameters()),
                "embeddings": embeddings}

    def set_gradient_checkpointing(self, enable: bool = True) -> "Qwen2VL":
        """Recompute each vision block and each decoder layer in the backward (no-grad calls and
        generation never checkpoint). Returns self."""
        return set_gradient_checkpointing(self, enable)

    def _packed_linears(self) -> list[nn.Module]:
        return [m for layer in self.model.language_model.layers
                for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, input_ids, vision=None, _unused=None, attention_mask=None) -> "_inputs.VisionInputs":
        """generate()'s protocol: vision is a VisionInputs (already checked) or None."""
        if vision is None or not isinstance(vision, _inputs.VisionInputs):
            return _inputs.check(self.config, input_ids, attention_mask, pixel_values=vision)
        return vision

    def vision_inputs(self, input_ids, attention_mask=None, **given) -> "_inputs.VisionInputs":
        """Checks a call's arguments (ValueError / TypeError naming the argument) and bundles
        the vision ones. given: pixel_values, image_grid_thw, pixel_values_videos,
        video_grid_thw, second_per_grid_ts, mm_token_type_ids."""
        return _inputs.check(self.config, input_ids, attention_mask, **given)

    # ------------------------------------------------------------------ images, positions

    @weights_held_once
    def image_features(self, pixel_values: torch.Tensor, grid_thw: list) -> torch.Tensor:
        """(sum t*h*w, C*tp*p*p) flattened patches + their grids -> (sum t*h*w / m^2, D_text)."""
        return self.model.visual(pixel_values.to(self.dtype), grid_thw)

    def embed(self, input_ids: torch.Tensor, vision: "_inputs.VisionInputs") -> torch.Tensor:
        """Token embeddings (B, L, D), image and video features written over their tokens."""
        table = self.model.language_model.embed_tokens
        embeds = _ops.embedding(input_ids, table, weight_used_once=self._untied)
        for pixels, grids, token in ((vision.pixel_values, vision.image_grid_thw, self.config.image_token_id),
                                     (vision.pixel_values_videos, vision.video_grid_thw, self.config.video_token_id)):
            if pixels is None:
                continue
            features = self.image_features(pixels, grids)
            mask = (input_ids == token).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        return embeds

    def _video_intervals(self, vision: "_inputs.VisionInputs") -> list | None:
        """Qwen2.5-VL spaces a video's frames by tokens_per_second * second_per_grid_ts; Qwen2-VL by 1."""
        if vision.video_grid_thw is None or self.config.version != "qwen2_5_vl":
            return None
        seconds = vision.second_per_grid_ts or [1] * len(vision.video_grid_thw)
        return [self.config.vision_config.tokens_per_second * s for s in seconds]

    def mrope_positions(self, input_ids, vision: "_inputs.VisionInputs", attention_mask=None) -> torch.Tensor:
        """int64 (3, B, L): the M-RoPE positions of the prompt tokens (rope_index.py)."""
        types = vision.mm_token_type_ids
        if types is None:
            types = _inputs.token_types(self.config, input_ids)
        return rope_index(types, vision.image_grid_thw or [], vision.video_grid_thw or [],
                          self.config.vision_config.spatial_merge_size, attention_mask=attention_mask,
                          video_intervals=self._video_intervals(vision))

    # ------------------------------------------------------------------ forward, loss

    @weights_held_once
    def hidden_states(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None,
                      pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None,
                      second_per_grid_ts=None) -> torch.Tensor:
        """The decoder's final-norm output (B, L, D), no cache."""
        vision = self.vision_inputs(input_ids, attention_mask, pixel_values=pixel_values,
                                    image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                    video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                    mm_token_type_ids=mm_token_type_ids)
        B, L = input_ids.shape
        embeds = self.embed(input_ids, vision)
        if vision.has_vision:
            positions = self.mrope_positions(input_ids, vision, attention_mask)
        else:  # transformers' forward numbers every token 0..L-1, padding or not
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        mask, causal = None, True
        if attention_mask is not None and not bool(attention_mask.all()):
            mask, causal = causal_padding_mask(attention_mask.to(torch.bool)), False
        return self.model.language_model(embeds, positions, attn_mask=mask, is_causal=causal)

    @weights_held_once
    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None,
                pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None,
                second_per_grid_ts=None) -> torch.Tensor:
        """Logits (B, L, V), equal to transformers' Qwen2VLForConditionalGeneration's (or
        Qwen2_5_VLForConditionalGeneration's) for the same inputs."""
        return self.head(self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask,
                                            pixel_values_videos, video_grid_thw, mm_token_type_ids,
                                            second_per_grid_ts))

    @weights_held_once
    def loss(self, input_ids, labels, pixel_values=None, image_grid_thw=None, attention_mask=None,
             pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None,
             second_per_grid_ts=None) -> torch.Tensor:
        """Mean next-token cross entropy: logits at i predict labels[i + 1], -100 ignored
        (transformers' ForCausalLMLoss), fused with the head (no (B, L, V) logits held)."""
        check_labels(input_ids, labels)
        hidden = self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask, pixel_values_videos,
                                    video_grid_thw, mm_token_type_ids, second_per_grid_ts)
        return self.next_token_loss(hidden, labels)

    # ------------------------------------------------------------------ cached steps (generation)

    def new_cache(self, batch_size: int, max_len: int) -> MRopeKVCache:
        text = self.config.text_config
        return MRopeKVCache(text.num_hidden_layers, batch_size, text.num_key_value_heads, max_len, text.head_dim,
                            device=self.device, dtype=self.dtype)

    @weights_held_once
    def prefill(self, input_ids, vision, _unused, attention_mask, cache) -> tuple:
        """Runs the prompt into an empty cache (slots [0, L)); attention_mask bool (B, L).
        Returns (logits of the last slot (B, V) float32, the temporal position of each row's
        last token (B,)); the other two components' offsets go to cache.offsets."""
        vision = vision if isinstance(vision, _inputs.VisionInputs) else _inputs.VisionInputs()
        B, L = input_ids.shape
        embeds = self.embed(input_ids, vision)
        # transformers' generate: M-RoPE over the real tokens, text-only prompts included
        positions = self.mrope_positions(input_ids, vision, attention_mask)
        cache.append_mask(attention_mask)
        padded = not bool(attention_mask.all())
        mask = causal_padding_mask(attention_mask) if padded else None
        uniform = bool((positions[0] == positions[1]).all() and (positions[0] == positions[2]).all())
        hidden = self.model.language_model(embeds, positions[0] if uniform else positions, attn_mask=mask,
                                           is_causal=not padded, cache=cache, slot=0)
        cache.advance(L)
        last = positions[:, :, -1]
        if isinstance(cache, MRopeKVCache):
            cache.offsets.copy_(last - last[0])
            cache.uniform = bool((cache.offsets == 0).all())
        return self.head(hidden[:, -1]).float(), last[0].clone()

    def _step_positions(self, positions: torch.Tensor, cache) -> torch.Tensor:
        """(B,) temporal positions -> (B, 1) or, with offsets, (3, B, 1)."""
        if getattr(cache, "uniform", True):
            return positions[:, None]
        return (positions[None, :] + cache.offsets)[:, :, None]

    def decodes_natively(self, tokens: torch.Tensor, cache) -> bool:
        """Whether decode_step will take the native CPU path for these rows (generate() asks)."""
        return self.native_decode and getattr(cache, "uniform", True) and native_decode.will_run(self, tokens, cache)

    def native_steps(self, tokens, positions, cache):
        """generate()'s decode step for one call on `cache`, the native one checked once, or None
        (M-RoPE offsets that differ between rows: the eager step)."""
        if not (self.native_decode and getattr(cache, "uniform", True)):
            return None
        return native_decode.sequence_steps(self, tokens, positions, cache)

    @weights_held_once
    def decode_step(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        """One token per row into slot cache.length. tokens int (B,), positions int (B,) (the
        temporal component). Returns logits (B, V) float32."""
        if self.native_decode and getattr(cache, "uniform", True):
            logits = native_decode.decode_step(self, tokens, positions, cache, padded)
            if logits is not None:
                return logits
        slot = cache.length
        cache.key_mask[:, slot] = True
        embeds = self.model.language_model.embed_tokens(tokens[:, None])
        mask = cache.attention_mask(slot + 1) if padded else None
        hidden = self.model.language_model(embeds, self._step_positions(positions, cache), attn_mask=mask,
                                           cache=cache, slot=slot)
        cache.advance(1)
        return self.head(hidden[:, 0]).float()

    def decode_step_static(self, tokens, positions, slot, cache) -> torch.Tensor:
        """decode_step with step-independent shapes (the CUDA-graph capturable step): slot an
        int64 (1,) tensor, attention over all max_len slots under the key mask, the M-RoPE
        offsets always added. The caller advances cache.length."""
        cache.key_mask.index_fill_(1, slot, True)
        embeds = self.model.language_model.embed_tokens(tokens[:, None])
        offsets = getattr(cache, "offsets", None)  # a plain StaticKVCache: 1D rotary
        steps = positions[:, None] if offsets is None else (positions[None, :] + offsets)[:, :, None]
        hidden = self.model.language_model(embeds, steps, attn_mask=cache.attention_mask(cache.max_len),
                                           cache=cache, slot=slot)
        return self.head(hidden[:, 0]).float()

    @weights_held_once
    def generate(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                 pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, **options) -> torch.Tensor:
        """Batched generation with a static KV cache, rows left-padded. Returns int (B, L + new);
        greedy output equals transformers' generate(do_sample=False). eos_token_id None: the
        checkpoint's generation_config.json, else the decoder config's. More options (top_k,
        pad_token_id, streamer, generator, cache, static_shapes, cuda_graphs):
        vlmfast.generation.generate."""
        from vlmfast.generation.generate import generate

        vision = self.vision_inputs(input_ids, attention_mask, pixel_values=pixel_values,
                                    image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                    video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                    mm_token_type_ids=mm_token_type_ids)
        eos_token_id, options = with_generation_defaults(self.generation_defaults, eos_token_id, options)
        # the vision inputs travel as one object in generate()'s pixel_values slot (see check_inputs)
        return generate(self, input_ids, vision, None, attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                        **options)
