"""A static KV cache: every buffer allocated once, written in place, never reallocated.

Per layer, keys and values of shape (B, Hkv, max_len, E). Rows are left-padded and aligned,
so slot t holds the t-th token of every row (its rotary position may differ per row); a bool
key mask (B, max_len) records which slots hold real tokens (False on left padding). Decoding
writes one slot per step: nothing grows, nothing is copied, and the shapes a step touches are
fixed, which is what a captured CUDA graph needs.
"""

import torch


class StaticKVCache:
    """Preallocated keys/values for `num_layers` layers.

    keys[i], values[i]: (batch_size, num_kv_heads, max_len, head_dim), the model's dtype.
    key_mask: bool (batch_size, max_len), True where a slot holds a real token.
    length: slots written so far (the next token goes to slot `length`).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 device=None, dtype=torch.float32):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def reset(self) -> None:
        """Forget every token (buffers are kept; stale values are masked out by key_mask)."""
        self.key_mask.zero_()
        self.length = 0

    def check_room(self, batch_size: int, new_tokens: int, *, what: str = "input_ids") -> None:
        """ValueError naming `what` unless `new_tokens` more slots fit for `batch_size` rows."""
        if batch_size != self.batch_size:
            raise ValueError(f"{what}: expected a batch of {self.batch_size} rows (the cache's), got {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"{what}: {new_tokens} more tokens after {self.length} cached do not fit the cache's "
                f"max_len={self.max_len}"
            )

    def append_mask(self, valid: torch.Tensor) -> None:
        """Marks the next valid.shape[1] slots: valid bool (B, L), False on padding."""
        self.key_mask[:, self.length : self.length + valid.shape[1]] = valid

    def advance(self, n: int) -> None:
        self.length += n

    def attention_mask(self, end: int) -> torch.Tensor:
        """bool (B, 1, 1, end): the key-padding mask over slots [0, end) (a view)."""
        return self.key_mask[:, None, None, :end]


def write_kv(kv: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor, slot):
    """Writes one call's keys / values (B, Hkv, L, E) into a layer's cache (keys, values) from slot
    on, and returns the keys / values the call attends to. slot: an int (the first slot of the
    L written: the cache's slots up to slot + L), or an int64 tensor of the L slots (static
    shapes, CUDA-graph capturable: the whole cache, whose key mask hides the slots not written
    yet)."""
    k_cache, v_cache = kv
    if isinstance(slot, torch.Tensor):
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
        return k_cache, v_cache
    L = k.shape[2]
    k_cache[:, :, slot : slot + L].copy_(k)
    v_cache[:, :, slot : slot + L].copy_(v)
    if slot > 0:  # earlier tokens live only in the cache
        return k_cache[:, :, : slot + L], v_cache[:, :, : slot + L]
    return k, v
