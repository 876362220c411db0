"""Caption metrics vs pycocoevalcap's scorers (the COCO caption evaluation), fed pre-tokenised text."""

import math
import random

import pytest

from vlmfast.eval import bleu, cider_d, rouge_l, tokenize_caption

pycocoevalcap = pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

VOCAB = "a the man dog cat red blue sits on runs in park with ball two of".split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(low, high)))


def _corpus(seed: int, size: int = 240):
    """Candidates and references with repeats, 1-3 word and empty candidates, and empty references."""
    rng = random.Random(seed)
    candidates, references = [], []
    for i in range(size):
        refs = [_sentence(rng, 3, 14) for _ in range(rng.randint(1, 6))]
        kind = i % 8
        if kind == 0:
            candidate = ""
        elif kind == 1:
            candidate = _sentence(rng, 1, 3)
        elif kind == 2:
            candidate = rng.choice(refs)  # an exact copy of a reference
        elif kind == 3 and candidates:
            candidate = rng.choice(candidates)  # a repeated candidate
            refs = refs + [refs[0]]  # and a repeated reference
        elif kind == 4:
            candidate = " ".join([rng.choice(VOCAB)] * rng.randint(2, 6))  # one word repeated
        else:
            candidate = _sentence(rng, 2, 16)
        if i % 37 == 5:
            refs = refs + [""]
        candidates.append(candidate)
        references.append(refs)
    return candidates, references


def _coco(candidates, references):
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_equals_pycocoevalcap(seed):
    candidates, references = _corpus(seed)
    gts, res = _coco(candidates, references)
    for n in (1, 2, 4):
        expected, _ = Bleu(n).compute_score(gts, res, verbose=0)
        got = bleu(candidates, references, n=n)
        assert len(got) == n
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_equals_pycocoevalcap(seed):
    candidates, references = _corpus(seed)
    expected, _ = Cider().compute_score(*_coco(candidates, references))
    assert cider_d(candidates, references) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected > 0.1  # the corpus is not degenerate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_l_equals_pycocoevalcap(seed):
    candidates, references = _corpus(seed)
    expected, _ = Rouge().compute_score(*_coco(candidates, references))
    assert rouge_l(candidates, references) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_small_corpora_equal_pycocoevalcap():
    """Tiny corpora where idf or the brevity penalty degenerate: one caption, all-empty candidates."""
    cases = [
        (["a dog runs"], [["a dog runs in the park"]]),
        (["", ""], [["a dog"], ["the cat sits"]]),
        (["dog", "a red ball"], [["dog", "a dog"], ["a red ball", "red ball"]]),
    ]
    for candidates, references in cases:
        gts, res = _coco(candidates, references)
        assert bleu(candidates, references) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0], rel=1e-9, abs=1e-12)
        assert cider_d(candidates, references) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9, abs=1e-12)
        assert rouge_l(candidates, references) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-9, abs=1e-12)


def test_hand_computed_values():
    # A perfect match: every BLEU is 1, ROUGE-L is 1.
    assert bleu(["a man rides a horse"], [["a man rides a horse"]]) == pytest.approx([1.0] * 4)
    assert rouge_l(["a man rides a horse"], [["a man rides a horse"]]) == pytest.approx(1.0)
    # BLEU-1 of "the the the" vs "the cat": clipped matches 1 of 3, no brevity penalty.
    assert bleu(["the the the"], [["the cat"]], n=1)[0] == pytest.approx(1 / 3)
    # Brevity penalty: "a man" vs "a man rides": precision 1, c=2, r=3 -> exp(1 - 3/2).
    assert bleu(["a man"], [["a man rides"]], n=1)[0] == pytest.approx(math.exp(-0.5))
    # ROUGE-L: LCS("a b c d", "a c e") = 2 -> P = 2/3, R = 2/4, F with beta 1.2.
    p, r, b2 = 2 / 3, 2 / 4, 1.44
    assert rouge_l(["a c e"], [["a b c d"]]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    # CIDEr-D: two captions identical to their single reference, each n-gram in one document:
    # every clipped cosine is 1 and lengths agree, so each caption scores 10 ...
    assert cider_d(["a dog runs fast", "the cat sits still"], [["a dog runs fast"], ["the cat sits still"]]) == pytest.approx(10.0)
    # ... but a 3-word caption has no 4-gram: that order contributes 0, so 10 * 3/4.
    assert cider_d(["a dog runs", "the cat sits"], [["a dog runs"], ["the cat sits"]]) == pytest.approx(7.5)
    # With one caption, idf = log(1) - log(1) = 0 everywhere: CIDEr-D is 0.
    assert cider_d(["a dog"], [["a dog"]]) == 0.0


def test_tokenize_caption():
    assert tokenize_caption("A Dog's ball, on the GRASS.") == "a dog 's ball on the grass"
    assert tokenize_caption("  Two (2) men -- don't run!  ") == "two 2 men do n't run"
    assert tokenize_caption("") == ""


@pytest.mark.parametrize("metric", [bleu, cider_d, rouge_l])
def test_bad_input(metric):
    with pytest.raises(ValueError, match=r"references: expected one list per entry of candidates \(2\), got 1"):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="candidates: expected at least one string, got an empty list"):
        metric([], [])
    with pytest.raises(ValueError, match=r"references\[1\]: expected at least one string"):
        metric(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match=r"references\[0\]\[0\]: expected a string, got int"):
        metric(["a"], [[3]])
    with pytest.raises(TypeError, match="candidates: expected a list of strings, got str"):
        metric("a dog", [["a dog"]])


def test_bad_order_and_sigma():
    with pytest.raises(ValueError, match="n: expected a positive int"):
        bleu(["a"], [["a"]], n=0)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        cider_d(["a"], [["a"]], n=0)
    with pytest.raises(ValueError, match="sigma: expected a positive length-penalty width, got 0"):
        cider_d(["a"], [["a"]], sigma=0)
