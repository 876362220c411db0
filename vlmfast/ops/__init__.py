"""vlmfast.ops: fused ops with Triton, C++ and CUDA kernels, drop-in for their PyTorch peers.

Every op is a torch.library custom op in the `vlmfast` namespace with a fake implementation and
autograd; the backend is chosen by device (see _dispatch.py) and can be forced with
VLMFAST_BACKEND=triton|cpp|cuda|reference.
"""

from vlmfast.ops import reference
from vlmfast.ops.attention import attention_varlen, scaled_dot_product_attention
from vlmfast.ops.cross_entropy import linear_cross_entropy
from vlmfast.ops.embedding import embedding
from vlmfast.ops.linear import linear
from vlmfast.ops.losses import infonce_loss, siglip_loss
from vlmfast.ops.patch_embed import patch_embed
from vlmfast.ops.patching import PackedPatches, pack_images, patchify_image
from vlmfast.ops.rotary import apply_rotary_emb, rope_2d
from vlmfast.ops.swiglu import swiglu

__all__ = [
    "scaled_dot_product_attention",
    "attention_varlen",
    "apply_rotary_emb",
    "rope_2d",
    "infonce_loss",
    "siglip_loss",
    "patch_embed",
    "pack_images",
    "patchify_image",
    "PackedPatches",
    "linear_cross_entropy",
    "embedding",
    "linear",
    "swiglu",
    "reference",
]
