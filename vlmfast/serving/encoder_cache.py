"""Image features kept by the content of the image, so a picture sent again is not encoded again.

The key is a BLAKE2b digest of the vision inputs' bytes, shapes and dtypes (a SmolVLM tile and its
pixel mask; for other model families all the vision inputs of a prompt): equal inputs, equal
features, whoever sent them. Entries are evicted least recently used first beyond `max_bytes`.
Hashing a 512 x 512 float32 tile (3 MiB) costs about a millisecond; encoding it, about a second
on two CPU cores.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def content_key(*tensors) -> bytes:
    """A digest of the tensors' dtypes, shapes and values (None entries count as absent)."""
    digest = hashlib.blake2b(digest_size=20)
    for t in tensors:
        if t is None:
            digest.update(b"none;")
            continue
        t = t.detach()
        digest.update(f"{t.dtype};{tuple(t.shape)};".encode())
        data = t.contiguous().cpu()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            data = data.view(torch.int16)
        digest.update(memoryview(data.numpy()).cast("B"))
    return digest.digest()


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 64


class EncoderCache:
    """LRU of key -> features, at most max_bytes of tensors (0: keep nothing)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes):
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= nbytes(old)
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= nbytes(evicted)
