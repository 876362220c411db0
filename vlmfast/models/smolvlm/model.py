"""SmolVLM (SmolVLM, SmolVLM2, Idefics3 checkpoints): vision tower -> pixel shuffle + projection
-> image features written over the image tokens of the prompt -> Llama decoder -> logits.

Shapes (as transformers' SmolVLMForConditionalGeneration takes them):
  input_ids             int (B, L), image_seq_len image tokens per image, in image order
  pixel_values          float (B, N, C, H, W), N images per row (tiles + global image), rows
                        with fewer padded with all-zero images (dropped, as transformers does);
                        or uint8 (B, N, H, W, C) as decoded (the image processor's
                        output="uint8"): normalised inside the patch embedding with
                        model.image_normalization, padding images told by an all-0 pixel mask
  pixel_attention_mask  (B, N, H, W), nonzero on real pixels (None: all real)
  attention_mask        (B, L), 0 on (left) padding (None: no padding)
"""

import json
from pathlib import Path

import torch
from torch import nn

from vlmfast.models import checkpoint, weights_io
from vlmfast.models.layers import set_gradient_checkpointing
from vlmfast.models.prompt_checks import check_labels, check_prompt
from vlmfast.models.smolvlm import _ops, fast_decode
from vlmfast.models.smolvlm.config import SmolVLMConfig
from vlmfast.models.smolvlm.connector import Connector
from vlmfast.models.smolvlm.decoder import Decoder
from vlmfast.models.smolvlm.vision import VisionTransformer, patch_mask_from_pixels
from vlmfast.models.token_head import TokenTableHead
from vlmfast.models.weights_once import weights_held_once
from vlmfast.ops import _checks


class _Body(nn.Module):
    """transformers' SmolVLMModel: the three parts under their checkpoint names."""

    def __init__(self, cfg: SmolVLMConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.vision_model = VisionTransformer(cfg.vision_config, **kw)
        self.connector = Connector(cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.scale_factor, **kw)
        self.text_model = Decoder(cfg.text_config, **kw)


def fuse_gate_up(state: dict) -> dict:
    """`...mlp.gate_proj.*` + `...mlp.up_proj.*` -> `...mlp.gate_up.*` (one GEMM). Keys of a
    layer that lacks one of the two are left alone, so strict loading names them."""
    out, pending = {}, {}
    for key, value in state.items():
        prefix, _, kind = key.rpartition(".")
        owner, _, proj = prefix.rpartition(".")
        if proj in ("gate_proj", "up_proj") and owner.endswith("mlp"):
            pending.setdefault((owner, kind), {})[proj] = (key, value)
        else:
            out[key] = value
    for (owner, kind), found in pending.items():
        if len(found) == 2:
            out[f"{owner}.gate_up.{kind}"] = torch.cat([found["gate_proj"][1], found["up_proj"][1]], dim=0)
        else:
            out.update(dict(found.values()))
    return out


def split_gate_up(state: dict) -> dict:
    """fuse_gate_up undone: `...mlp.gate_up.*` -> `...mlp.gate_proj.*` + `...mlp.up_proj.*`
    (equal halves, gate first), each an owning contiguous tensor (what safetensors writes)."""
    out = {}
    for key, value in state.items():
        prefix, _, kind = key.rpartition(".")
        owner, _, proj = prefix.rpartition(".")
        if proj == "gate_up" and owner.endswith("mlp"):
            gate, up = value.chunk(2, dim=0)
            out[f"{owner}.gate_proj.{kind}"] = gate.clone().contiguous()
            out[f"{owner}.up_proj.{kind}"] = up.clone().contiguous()
        else:
            out[key] = value
    return out


def preferred_dtype(device=None) -> torch.dtype:
    """bfloat16 on a GPU that supports it and on a CPU with native bf16 arithmetic (AVX512-BF16
    or AMX, where bf16 GEMMs beat float32 and halve the bytes a decode step reads); else float32."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def read_generation_defaults(path) -> dict:
    """eos_token_id / pad_token_id of a checkpoint's generation_config.json (what transformers'
    generate uses by default), {} when there is none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    values = json.loads(file.read_text())
    return {k: values[k] for k in ("eos_token_id", "pad_token_id") if values.get(k) is not None}


def with_generation_defaults(defaults: dict, eos_token_id, options: dict) -> tuple:
    """(eos_token_id, options) of a generate call, the checkpoint's generation_defaults
    (read_generation_defaults) filling in a missing eos_token_id and pad_token_id."""
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id")
    if options.get("pad_token_id") is None and defaults.get("pad_token_id") is not None:
        options = {**options, "pad_token_id": defaults["pad_token_id"]}
    return eos_token_id, options


def read_image_normalization(path, default):
    """(image_mean, image_std) of a checkpoint's preprocessor_config.json, else `default`.
    Only uint8 pixel_values use it (float ones arrive normalised)."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return default
    values = json.loads(file.read_text())
    if values.get("image_mean") is None or values.get("image_std") is None:
        return default
    return tuple(float(m) for m in values["image_mean"]), tuple(float(s) for s in values["image_std"])


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool (B, L) key validity -> bool (B, 1, L, L): causal and valid keys only. A padding
    query (which no valid key precedes) also attends itself, so that no row is empty: its
    output is never read by a valid token, but must stay finite."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask[:, None, None, :]
    return mask | torch.eye(L, dtype=torch.bool, device=attention_mask.device)


class SmolVLM(TokenTableHead, nn.Module):
    def __init__(self, config: SmolVLMConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = _Body(config, device=device, dtype=dtype)
        text = config.text_config
        self.generation_defaults = {}  # eos / pad ids of the checkpoint's generation_config.json
        self.auto_pack = True  # generate() packs bf16 CPU weights on first use (pack_weights)
        self.fast_decode = True  # decode_step runs natively on a CPU where it can (fast_decode.py)
        # inference keeps no packed copy of the weights in vlmfast's GEMM: held once (weights_once.py)
        self.cache_packed_weights = False
        # (mean, std) for uint8 pixel_values: the checkpoint's preprocessor_config.json, else SmolVLM's
        self.image_normalization = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.lm_head = None
        if not config.tied:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False, device=device, dtype=dtype)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> "SmolVLM":
        """A directory in Hugging Face layout (config.json + safetensors) of a SmolVLM, SmolVLM2
        or Idefics3 checkpoint. dtype: the parameters' dtype (None keeps float32; "auto":
        bfloat16 where the device computes it natively, see preferred_dtype)."""
        dtype = checkpoint.resolve_dtype(dtype, device)
        config = SmolVLMConfig.from_hf(checkpoint.read_config(path))
        with torch.device("meta"):
            model = cls(config)
        # read, not memory-mapped, with q/k/v and gate/up read straight into their fused
        # tensors: the weights are held once, with no copy while loading (weights_io.py)
        # and each cast to dtype as it is read (a float32 checkpoint is never held whole)
        state = fuse_gate_up(weights_io.read_weights(path, fuse=True, dtype=dtype or torch.float32, device=device))
        if config.tied:
            state.pop("lm_head.weight", None)  # the embeddings are the head
        checkpoint.load_state(model, state, device=device, dtype=dtype)
        model.generation_defaults = read_generation_defaults(path)
        model.image_normalization = read_image_normalization(path, model.image_normalization)
        return model.eval()

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None, processor_from=None) -> None:
        """Writes a checkpoint directory that transformers' SmolVLMForConditionalGeneration and
        SmolVLM.from_pretrained load: config.json (a loaded checkpoint's own, fields vlmfast does
        not read kept), the weights under Hugging Face keys (q/k/v and gate/up split back; a tied
        head writes no lm_head.weight, as transformers does), sharded with an index above
        max_shard_bytes, each file atomically. processor_from: a checkpoint directory whose
        tokenizer / processor / generation files (checkpoint.PROCESSOR_FILES) are copied, so the
        output is complete for vlmfast's pipeline and transformers' AutoProcessor."""
        state = split_gate_up(checkpoint.native_to_hf(self.state_dict()))
        checkpoint.write_pretrained(path, self.config.to_hf(), state, generation_defaults=self.generation_defaults,
                                    max_shard_bytes=max_shard_bytes, processor_from=processor_from)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.text_model.embed_tokens

    def set_gradient_checkpointing(self, enable: bool = True) -> "SmolVLM":
        """Recompute each vision encoder layer and each decoder layer in the backward instead of
        keeping their activations (about one more forward of compute for much less memory).
        Generation (a KV cache) and no-grad calls never checkpoint. Returns self."""
        return set_gradient_checkpointing(self, enable)

    def _packed_linears(self) -> list[nn.Module]:
        return [m for layer in self.model.text_model.layers
                for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]

    # ------------------------------------------------------------------ validation

    def check_inputs(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None) -> None:
        """ValueError / TypeError naming the argument and the expected shape."""
        B, L = check_prompt(input_ids, attention_mask)
        if pixel_values is None:
            if pixel_attention_mask is not None:
                raise ValueError("pixel_attention_mask: given without pixel_values")
            return
        vis = self.config.vision_config
        p = vis.patch_size
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            if pixel_values.dim() != 5 or pixel_values.shape[0] != B or pixel_values.shape[4] != vis.num_channels:
                raise ValueError(
                    f"pixel_values: expected uint8 (B, N, H, W, C) = ({B}, N, H, W, {vis.num_channels}), "
                    f"got {_checks.shape_of(pixel_values)}"
                )
            H, W = pixel_values.shape[2:4]
        else:
            _checks.floating("pixel_values", pixel_values)
            if pixel_values.dim() != 5 or pixel_values.shape[0] != B or pixel_values.shape[2] != vis.num_channels:
                raise ValueError(
                    f"pixel_values: expected (B, N, C, H, W) = ({B}, N, {vis.num_channels}, H, W), "
                    f"got {_checks.shape_of(pixel_values)}"
                )
            H, W = pixel_values.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"pixel_values: expected H and W multiples of patch_size={p}, got {H} x {W}")
        side = H // p
        if H != W or side % self.config.scale_factor:
            # pixel shuffle regroups a square grid of patches in s x s blocks
            raise ValueError(
                f"pixel_values: expected square tiles (H == W) of a multiple of patch_size * scale_factor = "
                f"{p * self.config.scale_factor} pixels, got {H} x {W}"
            )
        if pixel_attention_mask is not None:
            _checks.tensor("pixel_attention_mask", pixel_attention_mask)
            expected = (B, pixel_values.shape[1], H, W)
            if tuple(pixel_attention_mask.shape) != expected:
                raise ValueError(
                    f"pixel_attention_mask: expected (B, N, H, W) = {expected}, "
                    f"got {_checks.shape_of(pixel_attention_mask)}"
                )

    # ------------------------------------------------------------------ images

    @weights_held_once
    def image_features(self, pixel_values, pixel_attention_mask=None):
        """Features of the real images of each row, in order.

        Returns (features (n_real, image_seq_len, D_text), images_per_row int (B,) on the CPU).
        An image whose pixels are all 0 is padding (transformers' rule) and is skipped.
        """
        B, N = pixel_values.shape[:2]
        decoded = pixel_values.dtype == torch.uint8
        tiles = pixel_values.reshape(B * N, *pixel_values.shape[2:])
        pixel_mask = None
        if pixel_attention_mask is not None:
            pixel_mask = pixel_attention_mask.reshape(B * N, *pixel_attention_mask.shape[2:])
        if decoded:  # a black uint8 image is all 0 too: padding is what the pixel mask leaves out
            real = torch.ones(B * N, dtype=torch.bool, device=tiles.device) if pixel_mask is None \
                else pixel_mask.flatten(1).any(dim=1)
        else:
            real = (tiles != 0).flatten(1).any(dim=1)
        images_per_row = real.view(B, N).sum(dim=1).cpu()
        if not bool(real.any()):
            return None, images_per_row
        all_real = bool(real.all())
        if not all_real:  # boolean indexing copies: only when there is padding to drop
            tiles = tiles[real]
        if not decoded:
            tiles = tiles.to(self.dtype)  # no copy when already in the model's dtype
        p = self.config.vision_config.patch_size
        H, W = (tiles.shape[1], tiles.shape[2]) if decoded else (tiles.shape[2], tiles.shape[3])
        if pixel_mask is None:
            patch_mask = torch.ones(tiles.shape[0], H // p, W // p, dtype=torch.bool, device=tiles.device)
        else:
            patch_mask = patch_mask_from_pixels(pixel_mask if all_real else pixel_mask[real], p)
        hidden = self.model.vision_model(tiles, patch_mask, self.image_normalization)
        return self.model.connector(hidden), images_per_row

    def embed(self, input_ids, pixel_values=None, pixel_attention_mask=None) -> torch.Tensor:
        """Token embeddings (B, L, D) with the image features written over the image tokens."""
        table = self.model.text_model.embed_tokens
        # untied, the table's only use is here: an optimizer in the backward may then update it
        # in slices, its dense (V, D) gradient never formed
        embeds = _ops.embedding(input_ids, table, weight_used_once=self._untied)
        is_image = input_ids == self.config.image_token_id
        tokens_per_row = is_image.sum(dim=1).cpu()
        seq = self.config.image_seq_len
        if pixel_values is not None:  # tiles smaller than image_size give fewer tokens
            width = pixel_values.shape[3] if pixel_values.dtype == torch.uint8 else pixel_values.shape[-1]
            seq = (width // self.config.vision_config.patch_size // self.config.scale_factor) ** 2
        if pixel_values is None:
            images_per_row, features = torch.zeros_like(tokens_per_row), None
        else:
            features, images_per_row = self.image_features(pixel_values, pixel_attention_mask)
        if not torch.equal(tokens_per_row, images_per_row * seq):
            raise ValueError(
                f"input_ids: expected image_seq_len={seq} image tokens (id {self.config.image_token_id}) per "
                f"image, i.e. {(images_per_row * seq).tolist()} per row for the images in pixel_values, got "
                f"{tokens_per_row.tolist()}"
            )
        if features is None:
            return embeds
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    # ------------------------------------------------------------------ forward, loss

    @weights_held_once
    def hidden_states(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None, *,
                      position_ids=None) -> torch.Tensor:
        """The decoder's final-norm output (B, L, D), no cache."""
        self.check_inputs(input_ids, pixel_values, pixel_attention_mask, attention_mask)
        B, L = input_ids.shape
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask)
        if position_ids is None:
            # transformers' forward numbers positions 0..L-1 whatever the padding (generate does not)
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        mask, causal = None, True
        if attention_mask is not None and not bool(attention_mask.all()):
            mask, causal = causal_padding_mask(attention_mask.to(torch.bool)), False
        return self.model.text_model(embeds, position_ids, attn_mask=mask, is_causal=causal)

    @weights_held_once
    def forward(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None, *,
                position_ids=None) -> torch.Tensor:
        """Logits (B, L, V), equal to transformers' SmolVLMForConditionalGeneration's."""
        return self.head(self.hidden_states(input_ids, pixel_values, pixel_attention_mask, attention_mask,
                                            position_ids=position_ids))

    @weights_held_once
    def loss(self, input_ids, labels, pixel_values=None, pixel_attention_mask=None,
             attention_mask=None) -> torch.Tensor:
        """Mean next-token cross entropy: logits at i predict labels[i + 1]; -100 is ignored
        (transformers' ForCausalLMLoss, float32 logits), fused with the head so that the
        (B, L, V) logits are never held. labels: int (B, L)."""
        check_labels(input_ids, labels)
        hidden = self.hidden_states(input_ids, pixel_values, pixel_attention_mask, attention_mask)
        return self.next_token_loss(hidden, labels)

    # ------------------------------------------------------------------ cached steps (generation)

    def new_cache(self, batch_size: int, max_len: int):
        from vlmfast.generation.cache import StaticKVCache

        text = self.config.text_config
        return StaticKVCache(text.num_hidden_layers, batch_size, text.num_key_value_heads, max_len, text.head_dim,
                             device=self.device, dtype=self.dtype)

    @weights_held_once
    def prefill(self, input_ids, pixel_values, pixel_attention_mask, attention_mask, cache) -> tuple:
        """Runs the prompt into an empty `cache` (slots [0, L)). attention_mask bool (B, L).
        Returns (logits of the last slot (B, V) float32, positions of the last token (B,))."""
        B, L = input_ids.shape
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # transformers' generate rule
        cache.append_mask(attention_mask)
        padded = not bool(attention_mask.all())
        mask = causal_padding_mask(attention_mask) if padded else None
        hidden = self.model.text_model(embeds, positions, attn_mask=mask, is_causal=not padded, cache=cache, slot=0)
        cache.advance(L)
        return self.head(hidden[:, -1]).float(), positions[:, -1].clone()

    @weights_held_once
    def decode_step(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        """One token per row into slot cache.length. tokens int (B,), positions int (B,) (their
        rotary positions). padded=False skips the key mask (no row has padding). Reads the
        cache up to the current slot only (shapes change every step). Returns logits (B, V)
        float32. On a CPU, a few rows run natively in one call (fast_decode.py)."""
        if self.fast_decode:
            logits = fast_decode.decode_step(self, tokens, positions, cache, padded)
            if logits is not None:
                return logits
        slot = cache.length
        cache.key_mask[:, slot] = True
        embeds = self.model.text_model.embed_tokens(tokens[:, None])
        mask = cache.attention_mask(slot + 1) if padded else None
        hidden = self.model.text_model(embeds, positions[:, None], attn_mask=mask, cache=cache, slot=slot)
        cache.advance(1)
        return self.head(hidden[:, 0]).float()

    def native_steps(self, tokens, positions, cache):
        """generate()'s decode step for one call on `cache`, the native one checked once
        (fast_decode.sequence_steps), or None: generate() then calls decode_step."""
        return fast_decode.sequence_steps(self, tokens, positions, cache) if self.fast_decode else None

    def decode_step_static(self, tokens, positions, slot, cache) -> torch.Tensor:
        """decode_step with shapes and Python control flow that do not depend on the step: the
        slot is an int64 (1,) tensor, keys/values are written with index_copy_ and attention
        reads all max_len slots under the key mask. This is the function to capture in a CUDA
        graph (static input buffers tokens/positions/slot, updated in place between replays);
        the caller advances cache.length. Returns logits (B, V) float32."""
        cache.key_mask.index_fill_(1, slot, True)
        embeds = self.model.text_model.embed_tokens(tokens[:, None])
        hidden = self.model.text_model(embeds, positions[:, None], attn_mask=cache.attention_mask(cache.max_len),
                                       cache=cache, slot=slot)
        return self.head(hidden[:, 0]).float()

    @weights_held_once
    def generate(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, **options) -> torch.Tensor:
        """Batched generation with a static KV cache, rows left-padded. Returns int (B, L + new);
        greedy output equals transformers' generate(do_sample=False). eos_token_id None: the
        checkpoint's generation_config.json, else its decoder config. More options (pad_token_id,
        streamer, generator, cache, decode_step): vlmfast.generation.generate."""
        from vlmfast.generation.generate import generate

        eos_token_id, options = with_generation_defaults(self.generation_defaults, eos_token_id, options)
        return generate(self, input_ids, pixel_values, pixel_attention_mask, attention_mask,
                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        eos_token_id=eos_token_id, **options)
