"""Prompt prefixes already prefilled, kept by content, so a prompt that starts like an earlier one
(the same picture asked again, a second turn of a conversation, a shared system prompt) copies
those keys / values and prefills only the rest.

Keys. A prompt's key at length p is a chain digest (BLAKE2b) over its first p token ids; at each
image token, the digest of the image its features come from goes into the chain too (`image_units`:
a SmolVLM tile with its pixel mask, a LLaVA / BLIP-2 image, a Qwen2-VL image's patches with its
grid; their bytes, shapes and dtypes). Two prompts with equal keys at p therefore have equal tokens
[0, p) and equal images behind the image tokens among them: their keys / values over [0, p) are
equal (attention is causal; each image's features depend on that image alone; rotary positions,
M-RoPE's included, depend only on those tokens and the grids of those images). So a next turn
that adds an image reuses the whole earlier conversation. Where the tokens cannot be matched to
images so (videos, an all-zero SmolVLM tile, counts that do not divide, another family), every
image token carries the digest of all the prompt's vision inputs together; with vision inputs but
none of the model's image-token ids known, that digest goes in at token 0 (only prompts with equal
images can then share anything).

Storage. After a prefill, the staging row's keys / values over the whole prompt are copied out
into an entry (one tensor per layer, keys and values); every length p >= min_tokens of it is
indexed by the prompt's key at p. A lookup finds the longest indexed prefix of a new prompt, at
most its length - 1 (the last token is always run: its logits give the first answer token).
Entries are evicted least recently used first beyond max_bytes; an entry shares nothing with
another (a prefix two entries share is stored twice), which keeps eviction trivial.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from vlmfast.serving.encoder_cache import content_key


def image_token_ids(model) -> set[int]:
    """The token ids a family writes image / video features over (config.json's names)."""
    config = model.config
    ids = set()
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def vision_digest(vision: dict) -> bytes | None:
    """One digest of a request's vision inputs (None: no vision inputs)."""
    if not vision:
        return None
    names = sorted(vision)
    tensors = [vision[k] for k in names if isinstance(vision[k], torch.Tensor)]
    others = repr([(k, vision[k]) for k in names if not isinstance(vision[k], torch.Tensor)])
    return content_key(*tensors) + others.encode()


def _equal_units(count: int, units: list[bytes]) -> list[bytes] | None:
    """Image tokens split evenly over units (a fixed number of tokens per tile / image)."""
    if not units or count % len(units):
        return None
    per = count // len(units)
    return [units[j // per] for j in range(count)]


def tile_key(pixels: torch.Tensor, masks: torch.Tensor | None, k: int) -> bytes:
    """The digest of SmolVLM tile k (pixels (1, N, ...), masks (1, N, H, W) or None): the encoder
    cache's key of that tile too, so a prefill hashes each tile once."""
    return content_key(pixels[:, k:k + 1], None if masks is None else masks[:, k:k + 1])


def image_units(model, input_ids: torch.Tensor, vision: dict, tile_keys: dict | None = None) -> list[bytes] | None:
    """For each image token of the prompt, in order, the digest of the tile / image whose
    features it carries; None where that is not known for sure (see the module doc).
    tile_keys: filled with SmolVLM's tile digests by tile index (for the encoder cache)."""
    from vlmfast.models.causal_vlm import CausalVLM
    from vlmfast.models.qwen2vl.model import Qwen2VL
    from vlmfast.models.smolvlm import SmolVLM

    token = getattr(model.config, "image_token_id", None)
    pixels = vision.get("pixel_values")
    if not isinstance(token, int) or not isinstance(pixels, torch.Tensor):
        return None
    count = int((input_ids == token).sum())
    if isinstance(model, SmolVLM) and set(vision) <= {"pixel_values", "pixel_attention_mask"} and pixels.dim() == 5:
        masks = vision.get("pixel_attention_mask")
        tiles = range(pixels.shape[1])
        if not all(bool(pixels[:, k].any()) for k in tiles):  # an all-zero tile is padding: no tokens
            return None
        keys = [tile_key(pixels, masks, k) for k in tiles]
        if tile_keys is not None:
            tile_keys.update(enumerate(keys))
        return _equal_units(count, keys)
    if isinstance(model, CausalVLM) and set(vision) == {"pixel_values"} and pixels.dim() == 4:
        return _equal_units(count, [content_key(pixels[k]) for k in range(pixels.shape[0])])
    if isinstance(model, Qwen2VL) and set(vision) == {"pixel_values", "image_grid_thw"}:
        grids = torch.as_tensor(vision["image_grid_thw"]).reshape(-1, 3).tolist()
        merge = model.config.vision_config.spatial_merge_size
        units, start = [], 0
        for grid in grids:
            patches = grid[0] * grid[1] * grid[2]
            digest = content_key(pixels[start:start + patches], torch.tensor(grid))
            units += [digest] * (patches // (merge * merge))
            start += patches
        return units if len(units) == count and start == pixels.shape[0] else None
    return None


def prompt_keys(input_ids: torch.Tensor, vision: dict, image_ids: set[int], units: list[bytes] | None = None
                ) -> list[bytes]:
    """keys[p - 1]: the key of the prompt's first p tokens (see the module doc). units: the
    digest behind each image token in order (image_units), None: the whole vision digest."""
    ids = input_ids.tolist()
    if units is not None and sum(t in image_ids for t in ids) != len(units):
        units = None  # other vision tokens (a video's) beside the images: no per-image keys
    digest = None if units is not None else vision_digest(vision)
    chain = hashlib.blake2b(digest_size=16)
    if digest is not None and not any(t in image_ids for t in ids):
        chain.update(b"vision:" + digest)
    keys = []
    seen = 0
    for token in ids:
        chain.update(token.to_bytes(8, "little", signed=True))
        if token in image_ids:
            if units is not None:
                chain.update(units[seen])
                seen += 1
            elif digest is not None:
                chain.update(digest)
        keys.append(chain.digest())
    return keys


class _Entry:
    __slots__ = ("keys", "values", "length", "nbytes", "index")

    def __init__(self, keys, values, length, index):
        self.keys, self.values, self.length, self.index = keys, values, length, index
        self.nbytes = sum(t.numel() * t.element_size() for t in keys + values)


class PrefixCache:
    """Prefilled prompt prefixes, LRU by bytes (max_bytes 0: keep nothing)."""

    def __init__(self, max_bytes: int, *, min_tokens: int = 16):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens: expected >= 1, got {min_tokens}")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, LRU order
        self._index: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, keys: list[bytes]) -> tuple[_Entry | None, int]:
        """(entry, p): the longest cached prefix of the prompt, p <= len(keys) - 1 (0: none)."""
        for p in range(len(keys) - 1, self.min_tokens - 1, -1):
            entry = self._index.get(keys[p - 1])
            if entry is not None:
                self._entries.move_to_end(id(entry))
                return entry, p
        return None, 0

    def restore(self, keys: list[bytes], staging) -> int:
        """Copies the longest cached prefix into the empty staging cache (slots [0, p), key
        mask set, length p) and returns p (0: nothing cached)."""
        entry, p = self.match(keys)
        if entry is None:
            return 0
        for dst, src in zip(staging.keys + staging.values, entry.keys + entry.values):
            dst[0, :, :p].copy_(src[:, :p])
        staging.key_mask[0, :p] = True
        staging.length = p
        self.hits += 1
        self.reused_tokens += p
        return p

    def store(self, keys: list[bytes], staging) -> None:
        """Keeps the staging row's keys / values of the prompt (slots [0, len(keys)))."""
        length = len(keys)
        if length < self.min_tokens or self.max_bytes == 0:
            return
        known = self._index.get(keys[-1])
        if known is not None:  # this very prompt (or a longer one starting with it) is cached
            self._entries.move_to_end(id(known))
            return
        per_token = sum(t[0, :, :1].numel() * t.element_size() for t in staging.keys + staging.values)
        if per_token * length > self.max_bytes:
            return
        entry = _Entry([t[0, :, :length].clone() for t in staging.keys],
                       [t[0, :, :length].clone() for t in staging.values], length,
                       keys[self.min_tokens - 1:])
        while self.bytes + entry.nbytes > self.max_bytes:
            self._evict()
        for key in entry.index:
            self._index[key] = entry
        self._entries[id(entry)] = entry
        self.bytes += entry.nbytes

    def _evict(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.bytes -= entry.nbytes
        for key in entry.index:
            if self._index.get(key) is entry:
                del self._index[key]
