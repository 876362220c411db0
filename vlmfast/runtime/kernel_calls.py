"""Which kernel ran: every launcher records its call here, under (op, backend).

The launchers record (kernels/*.py as "triton"; vlmfast/native/*.py as "cpp" on CPU tensors,
"cuda" on CUDA tensors) and the op layer records its PyTorch reference path as "reference", so a
test that forces a backend can prove that backend's kernel ran, not only that it was chosen
(tests/conftest.py's `backend` fixture reads `calls`).
"""

import collections

import torch

# (op, backend) -> number of launches. Reset never: readers compare before and after.
calls: collections.Counter = collections.Counter()


def record(op: str, backend: str) -> None:
    calls[(op, backend)] += 1


def record_native(op: str, device: torch.device) -> None:
    """A vlmfast/native launcher's call: the C++ kernel on CPU tensors, the CUDA one otherwise."""
    calls[(op, "cuda" if device.type == "cuda" else "cpp")] += 1
