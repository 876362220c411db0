"""VQA accuracy and answer normalisation; expectations written by hand from the official rules."""

import pytest

from vlmfast.eval import normalize_answer, vqa_accuracy
from vlmfast.eval.vqa import normalize_punctuation

# (raw prediction, its normalised form by the official rules)
TRICKY_ANSWERS = [
    ("two", "2"),                      # number words 0-10 become digits
    ("Ten", "10"),
    ("none", "0"),
    ("eleven", "eleven"),              # only zero..ten are mapped
    ("a dog", "dog"),                  # articles dropped
    ("The Red Car", "red car"),
    ("an apple and a pear", "apple and pear"),
    ("1,000", "1000"),                 # a comma between digits: every mark is deleted
    ("1,000 people, maybe", "1000 people maybe"),
    ("red,blue", "red blue"),          # no digit,digit comma and no space next to it: a space
    ("red, blue", "red blue"),         # a mark touching a space is deleted
    ("isnt", "isn't"),                 # contractions get their apostrophe back
    ("dont know", "don't know"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("yall", "y'all"),
    ("twas", "'twas"),
    ("hed've", "he'd've"),             # two apostrophes: either one may be missing ...
    ("he'dve", "he'd've"),
    ("hedve", "hedve"),                # ... but not both (the official table has no such entry)
    ("somebody'd", "somebodyd"),       # an official-table oddity, kept for comparability
    ("Im", "im"),                      # capitalised keys of the table never match (lower-cased first)
    ("black-and-white", "black and white"),  # punctuation inside a word: a space
    ("t-shirt", "t shirt"),
    ("left - right", "left right"),    # "- " occurs: deleted
    ("yes.", "yes"),                   # sentence period dropped
    ("3.5", "3.5"),                    # decimal point kept
    ("a.m.", "am"),
    ("mr. smith", "mr smith"),
    ("hello!!!", "hello"),             # "!" never touches a space: replaced by spaces, then split
    ("(yes)", "yes"),
    ("what?", "what"),
    ("it's", "it's"),                  # apostrophes are not punctuation here
    ("  Two\tDogs\n", "2 dogs"),       # tabs, newlines, case and spacing
    ("100%", "100%"),                  # % is not in the list
    ("a", ""),                         # a lone article vanishes
]


@pytest.mark.parametrize("raw, expected", TRICKY_ANSWERS)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_removal_is_capped_at_32():
    # The official code passes re.UNICODE (= 32) as the count of re.sub: only 32 periods go.
    assert normalize_punctuation("." * 40) == "." * 8


def _acc(matches: int, n: int = 10) -> float:
    # Leave-one-out by hand: the n - matches subsets without a matching answer left out keep
    # `matches`; the `matches` subsets that leave one out keep matches - 1.
    return ((n - matches) * min(1, matches / 3) + matches * min(1, (matches - 1) / 3)) / n


def test_leave_one_out_values():
    assert _acc(0) == 0.0 and _acc(3) == pytest.approx(0.9) and _acc(4) == 1.0
    for matches in range(11):
        answers = ["cat"] * matches + [f"dog{k}" for k in range(10 - matches)]
        assert vqa_accuracy(["cat"], [answers]) == pytest.approx(_acc(matches), abs=1e-15)
    # Hand values: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9.
    assert vqa_accuracy(["cat"], [["cat"] + ["dog"] * 9]) == pytest.approx(0.3)
    assert vqa_accuracy(["cat"], [["cat"] * 2 + ["dog"] * 8]) == pytest.approx(0.6)


def test_mean_over_questions_and_normalised_prediction():
    predictions = ["Two.", "a dog", "yes"]
    answers = [["2"] * 10, ["dog"] * 3 + ["cat"] * 7, ["no"] * 10]
    assert vqa_accuracy(predictions, answers) == pytest.approx((1.0 + 0.9 + 0.0) / 3)


def test_reference_normalisation_official_and_full():
    # Official: unanimous references are compared as stored, so "two" never matches "2".
    assert vqa_accuracy(["two"], [["two"] * 10]) == 0.0
    assert vqa_accuracy(["two"], [["two"] * 10], normalize_references="full") == 1.0
    # Official: disagreeing references get the punctuation rule only ("yes." -> "yes").
    answers = ["yes."] * 4 + ["no"] * 6
    assert vqa_accuracy(["yes"], [answers]) == 1.0
    # ... but not the article rule: "a dog" stays "a dog" and does not match "dog".
    assert vqa_accuracy(["dog"], [["a dog"] * 5 + ["cat"] * 5]) == 0.0
    assert vqa_accuracy(["dog"], [["a dog"] * 5 + ["cat"] * 5], normalize_references="full") == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match=r"answers: expected one list per entry of predictions \(2\), got 1"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="predictions: expected at least one string, got an empty list"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match=r"answers\[0\]: expected at least one string"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(TypeError, match=r"predictions\[1\]: expected a string, got NoneType"):
        vqa_accuracy(["a", None], [["a"], ["b"]])
    with pytest.raises(ValueError, match="normalize_references: expected 'official' or 'full'"):
        vqa_accuracy(["a"], [["a"]], normalize_references="none")
