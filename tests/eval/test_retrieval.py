"""Recall@K and zero-shot top-k against a brute-force check and hand-made cases."""

import numpy as np
import pytest
import torch

from vlmfast.eval import recall_at_k, zero_shot_accuracy
from vlmfast.eval import retrieval


def _brute_recall(similarity: np.ndarray, positives, k: int) -> float:
    hits = 0
    for q, items in enumerate(positives):
        # Stable order by decreasing score: ties go to the lower index.
        order = sorted(range(similarity.shape[1]), key=lambda j: (-similarity[q, j], j))
        hits += any(j in items for j in order[:k])
    return hits / len(positives)


@pytest.mark.parametrize("shape", [(1, 1), (3, 113), (197, 40)])
def test_recall_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    # Coarse scores make ties common, which exercises the tie rule.
    similarity = rng.integers(0, 5, size=shape).astype(np.float32)
    positives = [sorted(set(rng.integers(0, shape[1], size=rng.integers(1, 4)).tolist())) for _ in range(shape[0])]
    got = recall_at_k(torch.from_numpy(similarity), positives, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(_brute_recall(similarity, positives, k), abs=0)


def test_recall_chunks_agree(monkeypatch):
    similarity = torch.randn(50, 30, dtype=torch.float64)
    positives = [[q % 30, (q * 7) % 30] for q in range(50)]
    full = recall_at_k(similarity, positives)
    monkeypatch.setattr(retrieval, "_ROWS_PER_CHUNK", 7)
    assert recall_at_k(similarity, positives) == full


def test_recall_hand_case():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.8], [0.3, 0.3, 0.3]])
    # q0: positive 2 ranked 2nd; q1: positive 1 ties with 0 -> 0 first, ranked 3rd; q2: 0 first.
    result = recall_at_k(similarity, [[2], [1], [0]], ks=(1, 2, 3))
    assert result == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert recall_at_k(similarity.numpy(), [[2], [1], [0]], ks=1) == {1: pytest.approx(1 / 3)}


def test_zero_shot_top1_top5():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [1.0, 1, 1, 1, 1, 1, 1]])
    labels = [6, 6, 5]
    # row 0: label 6 is top; row 1: label 6 is last; row 2: all tied, label 5 ranks 6th.
    assert zero_shot_accuracy(logits, labels) == {1: pytest.approx(1 / 3), 5: pytest.approx(1 / 3)}
    assert zero_shot_accuracy(logits, torch.tensor(labels), ks=(6, 7)) == {6: pytest.approx(2 / 3), 7: 1.0}


def test_bad_input():
    sim = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"positives: expected one list of item indices per query \(2 rows"):
        recall_at_k(sim, [[0]])
    with pytest.raises(ValueError, match=r"positives\[1\]: expected at least one correct item index"):
        recall_at_k(sim, [[0], []])
    with pytest.raises(ValueError, match=r"positives\[0\]: expected item indices in \[0, 3\), got 3"):
        recall_at_k(sim, [[3], [0]])
    with pytest.raises(ValueError, match=r"similarity: expected \(Nq, Nd\), got \(3,\)"):
        recall_at_k(torch.zeros(3), [[0]])
    with pytest.raises(ValueError, match=r"similarity: expected \(Nq, Nd\) with at least one row"):
        recall_at_k(torch.zeros(0, 3), [])
    with pytest.raises(ValueError, match="ks: expected positive ints"):
        recall_at_k(sim, [[0], [1]], ks=(0,))
    with pytest.raises(ValueError, match="similarity: contains NaN"):
        recall_at_k(torch.tensor([[float("nan")]]), [[0]])
    with pytest.raises(ValueError, match=r"labels: expected 2 labels \(one per row of logits\), got 1"):
        zero_shot_accuracy(sim, [0])
    with pytest.raises(ValueError, match=r"labels\[0\]: expected a class index in \[0, 3\), got 5"):
        zero_shot_accuracy(sim, [5, 0])
    with pytest.raises(TypeError, match="similarity: expected a torch.Tensor or numpy array"):
        recall_at_k([[0.0]], [[0]])
