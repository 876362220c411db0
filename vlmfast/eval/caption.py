"""Caption metrics as the COCO caption evaluation (pycocoevalcap) reports them: BLEU, CIDEr-D, ROUGE-L.

Inputs are already tokenised: space-separated lower-case words (`tokenize_caption` gives a
PTB-like tokenisation for raw text). `candidates[i]` is scored against `references[i]`.

The COCO code has a few conventions that change the numbers; they are kept on purpose so that
scores are comparable with published ones (each is noted where it is applied):
- BLEU adds 1e-15 to every matched n-gram count and 1e-9 to every n-gram count of the candidates,
  so a corpus with no matching 4-gram still gets a small non-zero BLEU-4.
- CIDEr-D's Gaussian length penalty measures a caption's length as its number of bigrams.
"""

import math
import re
from collections import Counter

from vlmfast.eval import _checks

_BLEU_MATCH_EPS = 1e-15  # added to matched counts ("tiny" in the COCO code)
_BLEU_TOTAL_EPS = 1e-9  # added to candidate n-gram totals and the reference length ("small")
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2


def _check_order(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int (the highest n-gram order), got {n!r}")


def ngram_counts(words: list[str], max_n: int) -> Counter:
    """Counts of every n-gram (as a tuple of words) of order 1..max_n."""
    counts = Counter()
    for order in range(1, max_n + 1):
        for start in range(len(words) - order + 1):
            counts[tuple(words[start : start + order])] += 1
    return counts


# ---------------------------------------------------------------------------------------- BLEU


def bleu(candidates: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..BLEU-n, [b_1, ..., b_n], each in [0, 1].

    candidates: N strings; references: N non-empty lists of strings.
    Clipped n-gram matches and candidate n-gram totals are summed over the corpus; b_k is the
    geometric mean of the precisions of orders 1..k times the brevity penalty
    exp(1 - r / c) when c < r, where c is the total candidate length and r the sum over captions
    of the reference length closest to the candidate's (the shorter one on a tie).
    """
    candidates, references = _checks.candidates_and_references(candidates, references)
    _check_order(n)
    matched = [0] * n
    totals = [0] * n
    candidate_length = 0
    reference_length = 0
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        counts = ngram_counts(words, n)
        # Clip each n-gram by its largest count in any one reference.
        clip = Counter()
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            clip |= ngram_counts(ref_words, n)
        for gram, count in counts.items():
            matched[len(gram) - 1] += min(count, clip[gram])
        for order in range(1, n + 1):
            totals[order - 1] += max(0, len(words) - order + 1)
        candidate_length += len(words)
        reference_length += min(ref_lengths, key=lambda length: (abs(length - len(words)), length))

    scores = []
    precision_product = 1.0
    for order in range(n):
        # A running product (not a sum of logs) of the smoothed precisions, as the COCO code.
        precision_product *= (matched[order] + _BLEU_MATCH_EPS) / (totals[order] + _BLEU_TOTAL_EPS)
        scores.append(precision_product ** (1.0 / (order + 1)))
    ratio = (candidate_length + _BLEU_MATCH_EPS) / (reference_length + _BLEU_TOTAL_EPS)
    if ratio < 1.0:
        penalty = math.exp(1.0 - 1.0 / ratio)
        scores = [score * penalty for score in scores]
    return scores


# ------------------------------------------------------------------------------------- CIDEr-D


def _tfidf(counts: Counter, log_corpus_size: float, document_frequency: Counter, max_n: int):
    """Per order: {n-gram: tf * idf}, the vector's L2 norm, and the caption length in bigrams."""
    vectors = [dict() for _ in range(max_n)]
    squared = [0.0] * max_n
    bigrams = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        # An n-gram absent from every reference gets df 1 (idf = log N), as the COCO code does.
        weight = float(tf) * (log_corpus_size - math.log(max(1.0, document_frequency[gram])))
        vectors[order][gram] = weight
        squared[order] += weight * weight
        if order == 1:
            bigrams += tf
    return vectors, [math.sqrt(s) for s in squared], bigrams


def cider_d(
    candidates: list[str], references: list[list[str]], *, n: int = 4, sigma: float = CIDER_SIGMA
) -> float:
    """Corpus CIDEr-D (the mean of the per-caption scores), as the COCO caption evaluation.

    candidates: N strings; references: N non-empty lists of strings.
    idf(g) = log(N) - log(max(1, df(g))), df(g) = the number of captions whose references contain
    the n-gram g. For each order k = 1..n and each reference r: the clipped cosine
    sum_g min(c_g, r_g) * r_g / (|c| |r|) of the tf-idf vectors, times
    exp(-(len_c - len_r)^2 / (2 sigma^2)). A caption's score is 10 x the mean over orders of the
    mean over its references.
    """
    candidates, references = _checks.candidates_and_references(candidates, references)
    _check_order(n)
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive length-penalty width, got {sigma!r}")
    cooked_refs = [[ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    document_frequency = Counter()
    for refs in cooked_refs:
        document_frequency.update(set().union(*(ref.keys() for ref in refs)))
    log_corpus_size = math.log(float(len(candidates)))
    two_sigma_sq = 2.0 * sigma * sigma

    total = 0.0
    for candidate, refs in zip(candidates, cooked_refs):
        cand_vec, cand_norm, cand_len = _tfidf(
            ngram_counts(candidate.split(), n), log_corpus_size, document_frequency, n
        )
        per_order = [0.0] * n
        for ref in refs:
            ref_vec, ref_norm, ref_len = _tfidf(ref, log_corpus_size, document_frequency, n)
            penalty = math.exp(-float(cand_len - ref_len) ** 2 / two_sigma_sq)
            for order in range(n):
                dot = sum(
                    min(weight, ref_vec[order].get(gram, 0.0)) * ref_vec[order].get(gram, 0.0)
                    for gram, weight in cand_vec[order].items()
                )
                if cand_norm[order] != 0.0 and ref_norm[order] != 0.0:
                    dot /= cand_norm[order] * ref_norm[order]
                per_order[order] += dot * penalty
        total += 10.0 * (sum(per_order) / n) / len(refs)
    return total / len(candidates)


# ------------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for word in a:
        diagonal = 0
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if word == other else max(above, row[j - 1])
            diagonal = above
    return row[len(b)]


def _rouge_l_one(candidate: str, refs: list[str], beta: float) -> float:
    words = candidate.split()
    best_precision = best_recall = 0.0
    for ref in refs:
        ref_words = ref.split()
        if not words and not ref_words:
            return 1.0  # two empty captions agree completely
        lcs = _lcs_length(ref_words, words)
        if words:
            best_precision = max(best_precision, lcs / len(words))
        if ref_words:
            best_recall = max(best_recall, lcs / len(ref_words))
    # Precision and recall are maximised over the references separately, as the COCO code does.
    if best_precision == 0.0 or best_recall == 0.0:
        return 0.0
    beta_sq = beta * beta
    return (1 + beta_sq) * best_precision * best_recall / (best_recall + beta_sq * best_precision)


def rouge_l(candidates: list[str], references: list[list[str]], *, beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F-measure (beta 1.2) averaged over the candidates, as the COCO caption evaluation.

    candidates: N strings; references: N non-empty lists of strings. Per caption:
    P = max_r LCS(c, r) / |c|, R = max_r LCS(c, r) / |r|, F = (1 + b^2) P R / (R + b^2 P).
    """
    candidates, references = _checks.candidates_and_references(candidates, references)
    scores = [_rouge_l_one(c, refs, beta) for c, refs in zip(candidates, references)]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------- tokenising

# Punctuation the COCO evaluation drops after PTB tokenisation.
_PUNCTUATION = re.compile(r"[.?!,:;\-\"`()\[\]{}]+|'(?!(?:s|m|d|ll|re|ve|t)\b)")
_CLITIC = re.compile(r"(\w)('s|'m|'d|'ll|'re|'ve|n't)\b")


def tokenize_caption(text: str) -> str:
    """Raw caption -> space-separated lower-case words, close to the COCO PTB tokeniser.

    Lower-cases, splits clitics off ("dog's" -> "dog 's", "don't" -> "do n't") and drops
    punctuation. (The COCO code runs the Stanford Java tokeniser; this needs no Java and agrees
    with it on ordinary captions.)
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a string, got {type(text).__name__}")
    text = _CLITIC.sub(r"\1 \2", text.lower())
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())
