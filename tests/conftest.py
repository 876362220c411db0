"""Shared fixtures: backend forcing, device choice, and the tolerance rule of DESIGN.md."""

import os

import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen before triton is
# imported: do it here, before any test module (or torch.compile) imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["VLMFAST_POISON"] = "1"  # kernel outputs start as NaN (vlmfast/ops/_alloc.py)

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
        return sum(n for (_, backend), n in _dispatch.calls.items() if backend == self.name)


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request, monkeypatch):
    """Runs the test with VLMFAST_BACKEND forced, and fails it if that backend never ran."""
    forced = ForcedBackend(*request.param)
    monkeypatch.setenv("VLMFAST_BACKEND", forced.name)
    before = forced.calls()
    yield forced
    assert forced.calls() > before, f"the test never ran the {forced.name} backend"
