"""Generation: a static KV cache, sampling (greedy, temperature, top-p, stop tokens) and
batched generation with left padding, different images per row and token streaming."""

from vlmfast.generation.cache import StaticKVCache
from vlmfast.generation.generate import generate
from vlmfast.generation.sampling import next_tokens, top_k_filter, top_p_filter

__all__ = ["StaticKVCache", "generate", "next_tokens", "top_k_filter", "top_p_filter"]
