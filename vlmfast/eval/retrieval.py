"""Ranking metrics from a similarity matrix: Recall@K for retrieval, top-k accuracy for zero-shot.

Ranks are those of a stable sort by decreasing similarity: equal scores go to the lower index
first, so results do not depend on the sort implementation.
"""

from collections.abc import Sequence

import torch

# Queries ranked at a time: bounds the (chunk, Nd) comparison masks.
_ROWS_PER_CHUNK = 1024


def _matrix(name: str, value, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            import numpy as np

            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array {layout}, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name}: expected {layout}, got {tuple(value.shape)}")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real-valued matrix, got {value.dtype}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name}: expected {layout} with at least one row and column, got {tuple(value.shape)}")
    if value.dtype.is_floating_point and torch.isnan(value).any():
        raise ValueError(f"{name}: contains NaN; expected finite scores")
    return value.detach()


def _ks(ks) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    return ks


def _positive_lists(positives, num_queries: int, num_items: int) -> list[list[int]]:
    if isinstance(positives, torch.Tensor):
        positives = positives.tolist()
    if not isinstance(positives, Sequence) or isinstance(positives, str):
        raise TypeError(
            "positives: expected a list (one list of item indices per query), "
            f"got {type(positives).__name__}"
        )
    if len(positives) != num_queries:
        raise ValueError(
            f"positives: expected one list of item indices per query ({num_queries} rows of "
            f"similarity), got {len(positives)}"
        )
    out = []
    for q, items in enumerate(positives):
        items = [items] if isinstance(items, int) else list(items)
        if not items:
            raise ValueError(f"positives[{q}]: expected at least one correct item index, got none")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_items:
                raise ValueError(
                    f"positives[{q}]: expected item indices in [0, {num_items}), got {item!r}"
                )
        out.append(items)
    return out


def best_positive_ranks(similarity: torch.Tensor, positives: list[list[int]]) -> torch.Tensor:
    """For each query, the 0-based rank of its best-ranked positive item: (Nq,) int64.

    In a stable sort by decreasing score the best-ranked positive is the one with the highest
    score (the lowest index on a tie), and its rank is the number of items scoring higher plus
    the number of lower-indexed items scoring the same: counted directly, one O(Nd) pass per
    query and no sort, a chunk of queries at a time.
    """
    num_queries, num_items = similarity.shape
    query_of = torch.tensor([q for q, items in enumerate(positives) for _ in items], dtype=torch.int64)
    item_of = torch.tensor([i for items in positives for i in items], dtype=torch.int64)
    # The best positive of each query: highest score, then lowest index.
    score_of = similarity[query_of, item_of]
    top = torch.full((num_queries,), float("-inf"), dtype=score_of.dtype)
    top = top.scatter_reduce(0, query_of, score_of, reduce="amax")
    candidate = torch.where(score_of == top[query_of], item_of, torch.full_like(item_of, num_items))
    best_item = torch.full((num_queries,), num_items, dtype=torch.int64)
    best_item = best_item.scatter_reduce(0, query_of, candidate, reduce="amin")
    best_score = similarity.gather(1, best_item[:, None])

    columns = torch.arange(num_items, dtype=torch.int64)
    ranks = torch.empty(num_queries, dtype=torch.int64)
    for start in range(0, num_queries, _ROWS_PER_CHUNK):
        chunk = slice(start, start + _ROWS_PER_CHUNK)
        rows, score = similarity[chunk], best_score[chunk]
        higher = (rows > score).sum(dim=1)
        tied_before = ((rows == score) & (columns[None, :] < best_item[chunk, None])).sum(dim=1)
        ranks[chunk] = higher + tied_before
    return ranks


def recall_at_k(similarity, positives, ks=(1, 5, 10)) -> dict[int, float]:
    """Recall@K: the fraction of queries with a correct item among their K most similar items.

    similarity: (Nq, Nd) scores, higher = more similar (tensor or numpy array).
    positives: for each of the Nq queries, the list of correct item indices in [0, Nd).
    ks: the cut-offs K. Returns {K: recall in [0, 1]}.
    """
    similarity = _matrix("similarity", similarity, "(Nq, Nd)")
    ks = _ks(ks)
    positives = _positive_lists(positives, *similarity.shape)
    ranks = best_positive_ranks(similarity, positives)
    return {k: (ranks < k).double().mean().item() for k in ks}


def zero_shot_accuracy(logits, labels, ks=(1, 5)) -> dict[int, float]:
    """Top-k classification accuracy: the fraction of rows whose label is among the k highest logits.

    logits: (N, C) scores of N images for C classes; labels: N class indices in [0, C).
    Returns {k: accuracy in [0, 1]} (top-1 and top-5 by default).
    """
    logits = _matrix("logits", logits, "(N, C)")
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"labels: expected (N,), got {tuple(labels.shape)}")
        labels = labels.tolist()
    if not isinstance(labels, Sequence) or isinstance(labels, str):
        raise TypeError(f"labels: expected a list of class indices, got {type(labels).__name__}")
    if len(labels) != logits.shape[0]:
        raise ValueError(f"labels: expected {logits.shape[0]} labels (one per row of logits), got {len(labels)}")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < logits.shape[1]:
            raise ValueError(f"labels[{i}]: expected a class index in [0, {logits.shape[1]}), got {label!r}")
    ks = _ks(ks)
    ranks = best_positive_ranks(logits, [[label] for label in labels])
    return {k: (ranks < k).double().mean().item() for k in ks}
