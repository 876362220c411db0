"""English cardinal numbers in words ("sixty-four"), as num2words writes them: SmolVLM2's video
prompt spells the frame count out, and num2words is not a dependency of vlmfast."""

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = _ONES[rest]
    else:
        tens, ones = divmod(rest, 10)
        tail = _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{_ONES[hundreds]} hundred" + (f" and {tail}" if rest else "")


def number_words(n: int) -> str:
    """0 <= n < 10**6 in words: 'one hundred and one', 'one thousand, two hundred and thirty-four'."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 10**6:
        raise ValueError(f"n: expected an int in [0, 10**6), got {n!r}")
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _below_thousand(rest)
    words = f"{_below_thousand(thousands)} thousand"
    if not rest:
        return words
    # num2words joins a remainder with its own hundreds by a comma, a smaller one by "and"
    return words + (f", {_below_thousand(rest)}" if rest >= 100 else f" and {_below_thousand(rest)}")
