"""The VQA accuracy metric and its answer normalisation, as the official VQA evaluation code.

Official rules (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
- a prediction has newlines and tabs turned into spaces and is stripped, then goes through
  `normalize_punctuation` and `normalize_digits_articles`;
- the annotators' answers of a question go through `normalize_punctuation` only, and only when
  they are not all the same string (VQA's answers were already normalised when it was built);
- per question: for each of the n annotator answers, leave it out and score min(1, matches / 3)
  against the other n - 1; the question's accuracy is the mean of those n scores.
"""

import re

from vlmfast.eval import _checks

# Replaced by nothing when it touches a space (or the text has a digit,digit comma), else by a space.
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is meant to spare decimal points; its "(?!<=" is a typo for a look-behind,
# so in effect it drops every period not followed by a digit ("3.5" keeps its point, "5." not).
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
_PERIOD_MAX_REMOVED = 32

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Words written without an apostrophe -> the contraction (the official table's entries).

    Built from the contracted forms: a spelling with one of the apostrophes left out maps to the
    full form ("isnt" -> "isn't"; "couldnt've" and "couldn'tve" -> "couldn't've"). The official
    table lists exactly these one-apostrophe-missing variants, plus the few irregular entries below.
    """
    forms = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
             "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've "
             "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
             "oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've "
             "somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
             "something'd've something'll that's there'd there'd've there're there's they'd "
             "they'd've they'll they're they've wasn't we'd've we've weren't what'll what're "
             "what's what've when's where'd where's where've who'd who'd've who'll who's who've "
             "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
             "you'd you'd've you'll you're you've").split()  # fmt: skip
    table = {}
    for full in forms:
        parts = full.split("'")
        for missing in range(1, len(parts)):  # drop the apostrophe before parts[missing]
            table["'".join(parts[:missing]) + "'".join(parts[missing:])] = full
    # Entries of the official table that follow no rule above.
    table.update({"twas": "'twas", "somebody'd": "somebodyd", "ow's'at": "'ow's'at",
                  "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "let's": "let's",
                  "she's": "she's"})  # fmt: skip
    return table


CONTRACTIONS = _contractions()


def normalize_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, drop sentence periods.

    Each mark in the list is deleted when it touches a space somewhere in `text` or when `text`
    has a comma between digits ("1,000" -> "1000"), and otherwise replaced by a space
    ("black-white" -> "black white"). Periods not followed by a digit are deleted.
    """
    has_number_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if has_number_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVED)


def normalize_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words 0-10 -> digits, drop
    a/an/the, restore apostrophes of contractions ("isnt" -> "isn't"), single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official code normalises it before matching."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(answer))


def _reference_forms(answers: list[str], normalize_references: str) -> list[str]:
    if normalize_references == "full":
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:
        return [normalize_punctuation(a) for a in answers]
    return list(answers)


def question_accuracy(
    prediction: str, answers: list[str], *, normalize_references: str = "official"
) -> float:
    """One question's accuracy: mean over the leave-one-out subsets of min(1, matches / 3)."""
    predicted = normalize_answer(prediction)
    references = _reference_forms(answers, normalize_references)
    matches = sum(reference == predicted for reference in references)
    # Leaving out answer i removes one match exactly when answer i itself matched.
    total = sum(min(1.0, (matches - (reference == predicted)) / 3.0) for reference in references)
    return total / len(references)


def vqa_accuracy(
    predictions: list[str], answers: list[list[str]], *, normalize_references: str = "official"
) -> float:
    """Mean VQA accuracy over the questions, in [0, 1] (the official code reports 100x this).

    predictions: N predicted answers; answers: N lists of the annotators' answers (10 in VQA v2).
    normalize_references: "official" treats the annotators' answers exactly as the official code
    (punctuation only, and only when they disagree: VQA's annotations are stored normalised);
    "full" normalises them like predictions, for answer sets that were never normalised.
    """
    predictions = _checks.strings("predictions", predictions)
    answers = _checks.string_lists("answers", answers, len(predictions), "predictions")
    if normalize_references not in ("official", "full"):
        raise ValueError(
            f"normalize_references: expected 'official' or 'full', got {normalize_references!r}"
        )
    scores = [
        question_accuracy(p, a, normalize_references=normalize_references)
        for p, a in zip(predictions, answers)
    ]
    return sum(scores) / len(scores)
