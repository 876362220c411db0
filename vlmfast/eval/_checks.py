"""Input validation shared by the metrics: every message names the argument and what was expected."""

from collections.abc import Sequence


def strings(name: str, value) -> list[str]:
    """A non-empty list of strings."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of strings, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: expected at least one string, got an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(item).__name__}")
    return list(value)


def string_lists(name: str, value, count: int, count_of: str) -> list[list[str]]:
    """One non-empty list of strings per item of `count_of` (which has `count` items)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of lists of strings, got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(
            f"{name}: expected one list per entry of {count_of} ({count}), got {len(value)} lists"
        )
    out = []
    for i, group in enumerate(value):
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise TypeError(f"{name}[{i}]: expected a list of strings, got {type(group).__name__}")
        if len(group) == 0:
            raise ValueError(f"{name}[{i}]: expected at least one string, got an empty list")
        for j, item in enumerate(group):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}][{j}]: expected a string, got {type(item).__name__}")
        out.append(list(group))
    return out


def candidates_and_references(candidates, references) -> tuple[list[str], list[list[str]]]:
    candidates = strings("candidates", candidates)
    references = string_lists("references", references, len(candidates), "candidates")
    return candidates, references
