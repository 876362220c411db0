"""Prefill of one request into the staging row, in pieces the scheduler interleaves with decode
steps: image tiles through the vision tower one at a time (skipped when the encoder cache has
them), then the prompt through the decoder in chunks of at most the step's token budget.

Two runners:
- SmolVLM (and anything with its decoder layout: model.embed, model.model.text_model, model.head):
  per-tile encoder cache and chunked prefill. Chunk [a, b) attends to the cached slots [0, a)
  and causally to itself; a prompt in one chunk is computed exactly as SmolVLM.prefill computes
  it (same calls, same shapes).
- any other model with generate()'s protocol (new_cache / prefill / decode_step): the whole
  prompt in one model.prefill call; its image_features (if any) answered from the encoder cache,
  keyed by all of the prompt's vision inputs.
The features are handed to the model by shadowing its image_features method for the duration of
the call (an instance attribute), so the model's own embedding code, and its checks, run as is.

With a prefix cache (prefix_cache.py), a job first copies the longest cached prefix of its prompt
into the staging row and prefills only the rest: SmolVLM from that slot in chunks (its tiles not
encoded at all when the rest holds no image token), the generic families through
prefill_rest.py (families it does not know prefill from scratch). A finished prefill is stored.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vlmfast.serving import prefill_rest
from vlmfast.serving.encoder_cache import EncoderCache, content_key
from vlmfast.serving.prefix_cache import PrefixCache, image_token_ids, image_units, prompt_keys, tile_key


@contextmanager
def _image_features_from(model, answer):
    """model.image_features(...) returns answer(...) inside the block."""
    model.image_features = answer
    try:
        yield
    finally:
        del model.image_features


class PrefillJob:
    """One request's prefill. step(budget) does one piece and returns the tokens' worth of work
    it did; when `done`, logits (1, V) float32 of the prompt's last token and `position` (its
    rotary position, int64 (1,)) are set, and the staging cache holds the prompt. `reused`:
    the prompt's first tokens copied from the prefix cache (0: none)."""

    def __init__(self, runner: "Runner", request, staging):
        self.runner, self.request, self.staging = runner, request, staging
        self.done = False
        self.logits = None
        self.position = None
        self.tile_keys: dict[int, bytes] = {}  # SmolVLM tile digests the prefix keys computed
        self.keys = runner.prefix_keys(request, self.tile_keys)
        self.reused = runner.prefix_cache.restore(self.keys, staging) if self.keys else 0
        self.state = runner.start(self)

    def step(self, budget: int) -> int:
        work = self.runner.step(self, budget)
        if self.done and self.keys:
            self.runner.prefix_cache.store(self.keys, self.staging)
        return work


class Runner:
    """How the engine drives one model family (see the module doc)."""

    def __init__(self, model, encoder_cache: EncoderCache, prefix_cache: PrefixCache | None = None):
        self.model, self.encoder_cache, self.prefix_cache = model, encoder_cache, prefix_cache
        self.encoder_runs = 0  # vision encoder calls (tiles or prompts) actually run
        self.image_ids = image_token_ids(model)

    def resumes(self) -> bool:
        """Whether this runner can prefill a prompt's rest after a cached prefix."""
        return False

    def prefix_keys(self, request, tile_keys: dict | None = None) -> list[bytes] | None:
        cache = self.prefix_cache
        if cache is None or cache.max_bytes == 0 or not self.resumes():
            return None
        units = None
        if request.vision:
            try:
                units = image_units(self.model, request.input_ids, request.vision, tile_keys)
            except (ValueError, TypeError, RuntimeError, IndexError):
                units = None  # malformed vision inputs: the model's own checks will name the problem
        return prompt_keys(request.input_ids, request.vision, self.image_ids, units)

    def start(self, job) -> dict:
        return {}

    def step(self, job, budget: int) -> int:
        raise NotImplementedError


class GenericRunner(Runner):
    """model.prefill(input_ids, X, Y, attention_mask, cache) in one call, where (X, Y) are what the
    family's generate() hands generate: model.vision_inputs(...) and None (Qwen2-VL), else
    pixel_values and pixel_attention_mask (LLaVA, BLIP-2: None)."""

    def _prefill_args(self, ids, mask, vision: dict) -> tuple:
        model = self.model
        if hasattr(model, "vision_inputs"):
            return model.vision_inputs(ids, mask, **vision), None
        return vision.get("pixel_values"), vision.get("pixel_attention_mask")

    def resumes(self) -> bool:
        return prefill_rest.supports(self.model)

    def _cached_features(self, original):
        """image_features answered from the encoder cache, keyed by all of a call's inputs."""
        def cached(*args, **kw):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [kw[k] for k in sorted(kw) if isinstance(kw[k], torch.Tensor)]
            others = repr([a for a in args if not isinstance(a, torch.Tensor)]
                          + [(k, kw[k]) for k in sorted(kw) if not isinstance(kw[k], torch.Tensor)])
            key = content_key(*tensors) + others.encode()
            value = self.encoder_cache.get(key)
            if value is None:
                self.encoder_runs += 1
                value = original(*args, **kw)
                self.encoder_cache.put(key, value)
            return value

        return cached

    def step(self, job, budget: int) -> int:
        model, request = self.model, job.request
        ids = request.input_ids[None].to(model.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        vision = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in request.vision.items()}
        first, second = self._prefill_args(ids, mask, vision)
        original = getattr(model, "image_features", None)

        def run():
            if job.reused:
                return prefill_rest.prefill_rest(model, ids, first, second, job.reused, job.staging, self.image_ids)
            return model.prefill(ids, first, second, mask, job.staging)

        with torch.inference_mode():
            if original is None or not vision:
                logits, positions = run()
            else:
                with _image_features_from(model, self._cached_features(original)):
                    logits, positions = run()
        job.logits, job.position, job.done = logits, positions, True
        return request.prompt_len - job.reused


class SmolVLMRunner(Runner):
    """Tiles, then decoder chunks (see the module doc)."""

    @staticmethod
    def applies(model) -> bool:
        from vlmfast.models.smolvlm import SmolVLM

        return isinstance(model, SmolVLM)

    def resumes(self) -> bool:
        return True

    def start(self, job) -> dict:
        vision = job.request.vision
        pixels = vision.get("pixel_values")
        pixel_mask = vision.get("pixel_attention_mask")
        start = job.reused
        # after a cached prefix holding every image token, the rest is text: no tile is needed
        rest_is_text = start > 0 and not any(t in self.image_ids for t in job.request.input_ids[start:].tolist())
        tiles = [] if pixels is None or rest_is_text else list(range(pixels.shape[1]))
        return {"pixels": None if rest_is_text else pixels, "pixel_mask": pixel_mask, "tiles": tiles,
                "features": [], "embeds": None, "base": start if rest_is_text else 0, "done": start,
                "tile_keys": job.tile_keys}

    def _tile_cost(self, pixels) -> int:
        p = self.model.config.vision_config.patch_size
        side = pixels.shape[2] if pixels.dtype == torch.uint8 else pixels.shape[-1]
        return max(1, (side // p) ** 2)

    def step(self, job, budget: int) -> int:
        state = job.state
        with torch.inference_mode():
            if state["tiles"]:
                return self._encode_tile(state)
            return self._decode_chunk(job, state, budget)

    def _encode_tile(self, state) -> int:
        i = state["tiles"].pop(0)
        pixels, pixel_mask = state["pixels"], state["pixel_mask"]
        tile = pixels[:, i:i + 1]
        tile_mask = None if pixel_mask is None else pixel_mask[:, i:i + 1]
        key = state["tile_keys"].get(i) or tile_key(pixels, pixel_mask, i)
        features = self.encoder_cache.get(key)
        cost = 1
        if features is None:
            device = self.model.device
            self.encoder_runs += 1
            features, _ = self.model.image_features(tile.to(device),
                                                    None if tile_mask is None else tile_mask.to(device))
            features = "padding" if features is None else features  # an all-zero tile: no image
            self.encoder_cache.put(key, features)
            cost = self._tile_cost(pixels)
        if not isinstance(features, str):
            state["features"].append(features)
        return cost

    def _embeds(self, job, state) -> torch.Tensor:
        """Embeddings of tokens [base, L) (base > 0 only when they are all text)."""
        model = self.model
        ids = job.request.input_ids[None, state["base"]:].to(model.device)
        pixels, pixel_mask = state["pixels"], state["pixel_mask"]
        if pixels is None:
            return model.embed(ids)
        features = state["features"]
        counts = torch.tensor([len(features)])
        joined = torch.cat(features) if features else None

        def answer(*args, **kwargs):
            return joined, counts

        with _image_features_from(model, answer):
            return model.embed(ids, pixels.to(model.device), None if pixel_mask is None else pixel_mask.to(model.device))

    def _decode_chunk(self, job, state, budget: int) -> int:
        model = self.model
        if state["embeds"] is None:
            state["embeds"] = self._embeds(job, state)
        embeds = state["embeds"]
        base = state["base"]
        L = base + embeds.shape[1]
        a = state["done"]
        b = min(L, a + max(1, budget))
        cache = job.staging
        positions = torch.arange(a, b, device=model.device)[None]
        cache.key_mask[:, a:b] = True
        if a == 0:  # as SmolVLM.prefill with no padding: causal over the chunk itself
            mask, causal = None, True
        else:  # queries a..b-1 see every earlier slot and themselves
            keys = torch.arange(b, device=model.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]
            causal = False
        hidden = model.model.text_model(embeds[:, a - base:b - base], positions, attn_mask=mask, is_causal=causal,
                                        cache=cache, slot=a)
        cache.advance(b - a)
        state["done"] = b
        if b == L:
            job.logits = model.head(hidden[:, -1]).float()
            job.position = torch.tensor([L - 1], device=model.device)
            job.done = True
            state["embeds"] = None
        return b - a


def runner_for(model, encoder_cache: EncoderCache, prefix_cache: PrefixCache | None = None) -> Runner:
    if SmolVLMRunner.applies(model):
        return SmolVLMRunner(model, encoder_cache, prefix_cache)
    return GenericRunner(model, encoder_cache, prefix_cache)
