"""Freezing parts of a SmolVLM for fine-tuning: the vision tower, the connector, the decoder, the
embeddings (and an untied lm_head). A frozen parameter gets requires_grad=False: no gradient, no
optimizer state, and the backward skips its weight-gradient GEMMs."""

from torch import nn


def smolvlm_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{part: parameters} of a SmolVLM: vision = model.model.vision_model, connector =
    model.model.connector, decoder = model.model.text_model's layers and final norm, embeddings =
    embed_tokens and the lm_head when it is not tied to them. A model with a parts() method
    (Qwen2VL) names its own parts."""
    own = getattr(model, "parts", None)
    if callable(own):
        return own()
    body = getattr(model, "model", None)
    missing = [name for name in ("vision_model", "connector", "text_model") if not hasattr(body, name)]
    if body is None or missing or not hasattr(body.text_model, "embed_tokens"):
        raise TypeError(
            f"model: expected a SmolVLM (model.vision_model, model.connector, model.text_model with "
            f"embed_tokens, layers, norm), got {type(model).__name__}"
        )
    text = body.text_model
    embeddings = list(text.embed_tokens.parameters())
    if getattr(model, "lm_head", None) is not None:
        embeddings += list(model.lm_head.parameters())
    return {
        "vision": list(body.vision_model.parameters()),
        "connector": list(body.connector.parameters()),
        "decoder": list(text.layers.parameters()) + list(text.norm.parameters()),
        "embeddings": embeddings,
    }


def freeze(model: nn.Module, *, vision: bool = False, connector: bool = False, decoder: bool = False,
           embeddings: bool = False) -> int:
    """Freezes the chosen parts of a SmolVLM (requires_grad=False; parts not chosen are left as
    they are; LoRA adapters inside a chosen part are frozen too). Returns the number of scalar
    parameters (elements) in the chosen parts, all frozen now, counting each Parameter once."""
    parts = smolvlm_parts(model)
    chosen = {"vision": vision, "connector": connector, "decoder": decoder, "embeddings": embeddings}
    frozen, seen = 0, set()
    for part, wanted in chosen.items():
        if not wanted:
            continue
        for param in parts[part]:
            if id(param) in seen:
                continue
            seen.add(id(param))
            frozen += param.numel()
            param.requires_grad_(False)
    return frozen


def trainable_parameters(model: nn.Module) -> int:
    """Scalar parameters (elements) that still get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
