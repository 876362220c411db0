"""Embedding tables that skip their random init on the meta device.

Every from_pretrained builds its model on the meta device and assigns the checkpoint's tensors.
nn.Embedding initialises its table with normal_, and normal_ on a meta tensor goes through
torch._refs, which imports torch._dynamo (and sympy, and triton): measured ~1.6-2.7 s and ~150 MiB
of resident memory on the 2-core Zen 4, the first time in a process, for values nobody reads. On
a real device the table is initialised as nn.Embedding does.
"""

import torch
from torch import nn


def embedding(num_embeddings: int, dim: int, *, padding_idx: int | None = None, device=None,
              dtype=None) -> nn.Embedding:
    """nn.Embedding(num_embeddings, dim, padding_idx), uninitialised where it is built on the
    meta device (the `device` argument or the default device of a `with torch.device("meta")`)."""
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type != "meta":
        return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx, device=device, dtype=dtype)
    weight = torch.empty(num_embeddings, dim, device="meta", dtype=dtype)
    return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx, _weight=weight)
