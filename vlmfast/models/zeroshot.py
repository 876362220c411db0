"""Using a CLIP / SigLIP model: batched embedding, zero-shot classifiers from prompt templates
(ensembled), classification and the image-text similarity used for retrieval."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed_images(model, images, *, batch_size: int = 256, mean=None, std=None, normalize: bool = True) -> torch.Tensor:
    """images: uint8 (N, H, W, C) (normalised with mean/std inside the patch embedding) or float
    (N, C, H, W). Returns float32 (N, P), L2-normalised unless normalize=False."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        if chunk.is_floating_point():
            chunk = chunk.to(dtype)
        out.append(model.encode_image(chunk, mean=mean, std=std).float())
    feats = torch.cat(out)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def embed_texts(model, tokenizer, texts, *, batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """texts: list of N strings -> float32 (N, P), L2-normalised unless normalize=False."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[start : start + batch_size], device=device)
        if getattr(tokenizer, "pad_to_context", False):
            mask = None  # SigLIP was trained attending to its padding: its tokenizer gives no mask
        out.append(model.encode_text(ids, mask).float())
    feats = torch.cat(out)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates=("a photo of a {}.",)) -> torch.Tensor:
    """(C, P) unit class embeddings: for each class, the mean of its normalised prompt embeddings
    (every template filled with the class name), normalised again (CLIP's prompt ensembling).
    Templates use "{}" or "{label}" for the class name."""
    if not classnames:
        raise ValueError("classnames: expected at least one class name")
    if not templates:
        raise ValueError("templates: expected at least one prompt template")
    prompts = [t.replace("{label}", "{}").format(name) for name in classnames for t in templates]
    feats = embed_texts(model, tokenizer, prompts).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def class_probabilities(model, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities from unit image features and unit class embeddings, as the model
    scores image-text pairs: CLIP, softmax over the classes of exp(logit_scale) * cosine (open_clip's
    zero-shot classification); SigLIP (a model with logit_bias), sigmoid(exp(logit_scale) * cosine
    + logit_bias), each class on its own (SigLIP's probabilities need not sum to 1)."""
    cosine = classify(image_features, classifier)
    scale = model.logit_scale.detach().float().exp().reshape(-1)[0].to(cosine.device)
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        return torch.sigmoid(cosine * scale + bias.detach().float().reshape(-1)[0].to(cosine.device))
    return torch.softmax(cosine * scale, dim=-1)


def classify(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Unit image features (N, P) x unit class embeddings (C, P) -> cosine scores (N, C)."""
    if image_features.shape[-1] != classifier.shape[-1]:
        raise ValueError(
            f"classifier: expected (C, {image_features.shape[-1]}) like the image features, got {tuple(classifier.shape)}"
        )
    return image_features @ classifier.T
