"""`patch_transformers(model)`: run a loaded Hugging Face CLIP / SigLIP / SmolVLM model on
vlmfast's kernels, in place, with the same weights and the same outputs.

    model = transformers.CLIPModel.from_pretrained(...)
    vlmfast.patch_transformers(model)   # returns model; calling it again changes nothing

Two swaps:
- attention: transformers looks the attention function up by name
  (`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`) and the mask builder the same way
  (`ALL_MASK_ATTENTION_FUNCTIONS`). We register a "vlmfast" entry in both -- the attention calls
  vlmfast.ops.scaled_dot_product_attention, the masks are sdpa's (bool, True = attend) -- and
  point the model's configs (and sub-configs) at it with `set_attn_implementation`.
- patch embedding: every `embeddings.patch_embedding` Conv2d with stride == kernel, no padding,
  no groups gets the class `VlmfastPatchConv2d`, a Conv2d subclass whose forward is
  vlmfast.ops.patch_embed. The parameters, their names and the state dict stay the same.
"""

import torch
from torch import nn

from vlmfast import ops

IMPLEMENTATION = "vlmfast"

# config.model_type of every model this knows how to patch (top level or a single tower).
SUPPORTED_MODEL_TYPES = frozenset({
    "clip", "clip_vision_model", "clip_text_model",
    "siglip", "siglip_vision_model", "siglip_text_model",
    "smolvlm", "smolvlm_vision",
})


def vlmfast_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on vlmfast's kernel.

    query (B, H, L, E), key/value (B, Hkv, S, E) (Hkv < H when the module has
    num_key_value_groups > 1: grouped-query attention, no repeat_kv copy), attention_mask None or
    broadcastable to (B, H, L, S) (bool True = attend, or additive float). Returns
    ((B, L, H, E) contiguous, None) like transformers' sdpa function.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: vlmfast attention does not support a score soft-cap; use 'eager'")
    if kwargs.get("position_bias") is not None:
        raise ValueError("position_bias: vlmfast attention does not take a position bias; use 'sdpa'")
    length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Like transformers' sdpa path: a mask, when given, already holds the causal pattern, and a
    # single query (decoding) attends every cached key.
    is_causal = bool(is_causal) and attention_mask is None and length > 1
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, torch.float32, torch.float64):
        # A low-precision additive mask holds finfo.min rather than -inf; float32 keeps it exact.
        attention_mask = attention_mask.float()
    out = ops.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


class VlmfastPatchConv2d(nn.Conv2d):
    """A patchifying Conv2d (kernel p x p, stride p, no padding) whose forward runs
    vlmfast.ops.patch_embed: images (B, C, H, W) -> (B, D, H / p, W / p), equal to the conv.
    Sizes the kernel does not cover (H or W not a multiple of p) take the plain conv."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = self.kernel_size[0]
        b, _, h, w = images.shape
        if h % patch or w % patch or images.dtype != self.weight.dtype:
            return super().forward(images)
        tokens = ops.patch_embed(images, self.weight, self.bias)  # (B, N, D)
        # (B, N, D) -> (B, D, gh, gw) as a view: the caller's flatten(2).transpose(1, 2) gives
        # the (B, N, D) tokens back without a copy.
        return tokens.transpose(1, 2).unflatten(2, (h // patch, w // patch))


def _is_patchifying_conv(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
    no_padding = conv.padding in ("valid", (0, 0)) and conv.padding_mode == "zeros"
    return (kernel[0] == kernel[1] and stride == kernel and no_padding and conv.groups == 1
            and tuple(conv.dilation) == (1, 1))


def _register_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, vlmfast_attention_forward)
    if IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _check_supported(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is a test dependency
        raise TypeError("model: patch_transformers needs transformers installed") from error
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            "model: expected a transformers CLIP, SigLIP or SmolVLM model (config.model_type in "
            f"{sorted(SUPPORTED_MODEL_TYPES)}), got {type(model).__name__}"
            + (f" with model_type {model_type!r}" if model_type else "")
        )


def patch_transformers(model):
    """Swap the attention and the patch embedding of a transformers CLIP / SigLIP / SmolVLM
    model for vlmfast's, in place; the outputs stay equal (within float rounding).

    Arguments:
        model: a transformers CLIPModel, SiglipModel, SmolVLMForConditionalGeneration / SmolVLMModel,
            or one of their single towers (CLIPVisionModel, SiglipTextModel, ...).
    Returns:
        the same model. Patching twice is the same as once.
    Raises:
        TypeError: any other model.
    """
    _check_supported(model)
    _register_implementation()
    if model.config._attn_implementation != IMPLEMENTATION or any(
        getattr(sub, "config", None) is not None
        and getattr(sub.config, "_attn_implementation", IMPLEMENTATION) != IMPLEMENTATION
        for sub in model.modules()
    ):
        model.set_attn_implementation(IMPLEMENTATION)
    for name, module in model.named_modules():
        if name.endswith("embeddings.patch_embedding") and _is_patchifying_conv(module):
            module.__class__ = VlmfastPatchConv2d
    return model
