"""vlmfast: fused kernels and fast vision-language models on PyTorch.

    from vlmfast import ops      # drop-in fast ops (attention, rotary, losses, patch embedding)
    from vlmfast import nn       # modules built on them

Native extensions are optional at import: a missing one makes the ops fall back to the next
backend (Triton, then the PyTorch reference) with one warning.
"""

__version__ = "0.1.0"

from vlmfast import nn, ops  # noqa: E402
from vlmfast.patching_transformers import patch_transformers  # noqa: E402
from vlmfast.pipelines import pipeline  # noqa: E402

__all__ = ["ops", "nn", "patch_transformers", "pipeline", "__version__"]
