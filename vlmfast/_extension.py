"""Loads the native extensions (vlmfast._C, vlmfast._C_cuda) once, tolerating their absence."""

import functools
import importlib
import warnings
from types import ModuleType

_HOW_TO_BUILD = {
    "_C": "reinstall with `pip install -e .` (a C++17 compiler with OpenMP is needed)",
    "_C_cuda": "reinstall with `VLMFAST_CUDA=1 pip install -e .` (nvcc is needed)",
}


@functools.cache
def load(name: str) -> ModuleType | None:
    """The extension module `vlmfast.<name>`, or None when it was not built."""
    try:
        return importlib.import_module(f"vlmfast.{name}")
    except ImportError as error:
        _missing_reason[name] = str(error)
        return None


_missing_reason: dict[str, str] = {}
_warned: set[str] = set()


def warn_missing(name: str, fallback: str) -> None:
    """Warns once per extension that ops are falling back because it is missing."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"vlmfast.{name} is not available ({_missing_reason.get(name, 'not built')}); "
        f"falling back to the {fallback} backend. To build it: {_HOW_TO_BUILD[name]}.",
        RuntimeWarning,
        stacklevel=3,
    )
