"""Shared fixtures: backend forcing, device choice, and the tolerance rule of DESIGN.md.

Every backend that should run here must: the suite fails at collection when the C++ extension
is not built (unless VLMFAST_NO_EXT=1) or Triton is missing (on Linux, where the [test] extra
installs it), instead of quietly testing less.
"""

import os
import sys

import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen before triton is
# imported: do it here, before any test module (or torch.compile) imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["VLMFAST_POISON"] = "1"  # kernel outputs start as NaN (vlmfast/runtime/alloc.py)
# ops.linear runs vlmfast's GEMM for every eligible call instead of timing it against torch's per
# shape class (vlmfast/ops/_linear_choice.py): which one wins a timing can differ between
# processes, and a test comparing two processes (distributed training) must see the same GEMM.
os.environ.setdefault("VLMFAST_LINEAR_CHOICE", "vlmfast")
# A test that asks for measurement must time the classes itself, not start from the choices a
# benchmark or an earlier run left on disk (vlmfast/ops/_choice_cache.py); its own tests set a folder.
os.environ["VLMFAST_CACHE_DIR"] = "off"

import pytest  # noqa: E402

from vlmfast.ops import _dispatch  # noqa: E402


def _available_backends():
    """(backend, device) pairs that can run on this machine."""
    pairs = [("reference", "cpu")]
    if _dispatch._runs_on("cpp", "cpu"):
        pairs.append(("cpp", "cpu"))
    if _dispatch._runs_on("triton", "cpu"):
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [(name, "cuda") for name in ("triton", "cuda") if _dispatch._runs_on(name, "cuda")]
    return pairs


def _expected_backends():
    """What must be testable: a missing C++ build or Triton must fail the suite, not skip it."""
    expected = {("reference", "cpu"), ("cpp", "cpu")}
    if os.environ.get("VLMFAST_NO_EXT") == "1":
        expected.discard(("cpp", "cpu"))
    if sys.platform.startswith("linux"):  # pyproject's [test] extra installs triton there
        expected.add(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    return expected


BACKENDS = _available_backends()


def pytest_collection_modifyitems(config, items):
    missing = _expected_backends() - set(BACKENDS)
    if missing:
        raise pytest.UsageError(f"backends that should be available are not: {sorted(missing)}")


class ForcedBackend:
    def __init__(self, name: str, device: str):
        self.name, self.device = name, torch.device(device)

    def __repr__(self):
        return f"{self.name}-{self.device.type}"

    def calls(self) -> int:
        """Launches of this backend's kernels so far (the launchers record them)."""
        return sum(n for (_, backend), n in _dispatch.calls.items() if backend == self.name)

    def ops_without_kernel(self) -> dict:
        return {op: n for (op, backend), n in _dispatch.no_kernel.items() if backend == self.name}


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request, monkeypatch):
    """Runs the test with VLMFAST_BACKEND forced, and fails it if no kernel of that backend ran.
    A test whose ops have no kernel there (VLMFAST_BACKEND=cuda and attention, which Triton
    serves) ran their reference path instead: it is reported as skipped, not passed."""
    forced = ForcedBackend(*request.param)
    monkeypatch.setenv("VLMFAST_BACKEND", forced.name)
    before, unserved_before = forced.calls(), forced.ops_without_kernel()
    yield forced
    if forced.calls() > before:
        return
    unserved = {op for op, n in forced.ops_without_kernel().items() if n > unserved_before.get(op, 0)}
    if unserved:
        pytest.skip(f"no {forced.name} kernel for {', '.join(sorted(unserved))}")
    raise AssertionError(f"the test never ran a {forced.name} kernel")
