"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), stop tokens.

Same meaning as transformers' generate: with do_sample=False the argmax (first index on ties);
with do_sample=True logits / temperature, then top-k keeps the k largest (ties at the k-th
kept), then top-p keeps the smallest set of most likely tokens whose probability reaches top_p
(always at least one), then one multinomial draw (same draws as transformers for the same
torch seed). Note transformers' own default is top_k=50; here top_k is off unless given.
"""

import torch


def check_sampling(do_sample: bool, temperature: float, top_p: float, top_k: int | None = None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k: expected None or an int >= 0 (0: off), got {top_k!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool, got {type(do_sample).__name__}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature!r}")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) -> (B, V) with -inf outside each row's nucleus.

    Sorted ascending, a token is dropped when the probability of it and every less likely
    token together is at most 1 - top_p; the most likely token is never dropped.
    """
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= 1.0 - top_p
    drop_sorted[:, -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """logits (B, V) -> (B, V) with -inf below each row's k-th largest value (None / 0: off)."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def next_tokens(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits float (B, V) -> int64 (B,)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature if temperature != 1.0 else logits
    scores = top_p_filter(top_k_filter(scores, top_k), top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def stop_token_tensor(eos_token_id, device) -> torch.Tensor | None:
    """None, an int or a list of ints -> int64 (K,) or None."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id: expected a token id or a list of token ids, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)
