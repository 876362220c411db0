"""Prompt prefixes already prefilled, kept by content, so a prompt that starts like an earlier one
(the same picture asked again, a second turn of a conversation, a shared system prompt) copies
those keys / values and prefills only the rest.

Keys. A prompt's key at length p is a chain digest (BLAKE2b) over its first p token ids; at each
image / video token, the digest of the prompt's vision inputs (all their tensors' bytes, shapes
and dtypes, and the non-tensor ones' repr) goes into the chain too. Two prompts with equal keys at
p therefore have equal tokens [0, p) and, if an image token is among them, equal images, grids
and tile layout: their keys / values over [0, p) are equal (attention is causal; rotary positions,
M-RoPE's included, depend only on those tokens and the image grids). A prompt with vision inputs
but none of the model's image-token ids known mixes the vision digest in at token 0 (only prompts
with equal images can then share anything). Because the digest covers the request's images
together, a later turn that adds a new image reuses the prefix up to its first image token only.

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


def prompt_keys(input_ids: torch.Tensor, vision: dict, image_ids: set[int]) -> list[bytes]:
    """keys[p - 1]: the key of the prompt's first p tokens (see the module doc)."""
    ids = input_ids.tolist()
    digest = vision_digest(vision)
    chain = hashlib.blake2b(digest_size=16)
    if digest is not None and not any(t in image_ids for t in ids):
        chain.update(b"vision:" + digest)
    keys = []
    for token in ids:
        chain.update(token.to_bytes(8, "little", signed=True))
        if digest is not None and token in image_ids:
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
