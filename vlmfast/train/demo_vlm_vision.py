"""The VLM demo's first stage: its vision tower pretrained contrastively, as SmolVLM's own tower
(SigLIP) was, before the decoder learns to talk about what it sees.

Why: trained from scratch through the decoder alone, the tiny model learnt colour at once but
shape stayed at chance for 1,500 steps (it memorised its training images instead), while the same
tower trained on image-caption pairs learns shape in a few hundred steps. So the demo first trains
a small SigLIP, whose vision transformer is exactly the SmolVLM tower's (same module names and
shapes; SigLIP's attention-pooling head is used for the loss only), on the shapes' captions with
the sigmoid loss, then hands the tower's weights to the SmolVLM (vision_tower_state).

    siglip = pretrain_vision_tower(TinySmolVLM(), images, captions, steps=600)
    build_tiny_smolvlm(dir, vision_tower=vision_tower_state(siglip))
"""

from __future__ import annotations

import numpy as np
import torch

from vlmfast.data.synthetic import caption_vocabulary

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # SmolVLM's image processor normalisation (both stages)
HEAD_PREFIX = "head."  # SigLIP's attention-pooling head: not part of SmolVLM's tower


def tower_siglip(architecture, vocab_size: int, context_length: int):
    """A SigLIP whose vision transformer has the SmolVLM tower's configuration, with a one-layer
    text tower over the caption words."""
    from vlmfast.models import SigLIP, SigLIPConfig, TextConfig, VisionConfig

    a = architecture
    vision = VisionConfig(hidden_size=a.vision_hidden, intermediate_size=2 * a.vision_hidden,
                          num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
                          image_size=a.image_size, patch_size=a.patch_size, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6)  # SmolVLMVisionConfig's activation and epsilon
    text = TextConfig(vocab_size=vocab_size, hidden_size=a.vision_hidden, intermediate_size=2 * a.vision_hidden,
                      num_hidden_layers=1, num_attention_heads=a.vision_heads,
                      max_position_embeddings=context_length, hidden_act="gelu_pytorch_tanh",
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return SigLIP(SigLIPConfig(text_config=text, vision_config=vision))


def pretrain_vision_tower(architecture, images: np.ndarray, captions, *, steps: int, batch_size: int = 64,
                          lr: float = 3e-3, seed: int = 0, log=None):
    """Trains tower_siglip on (images uint8 (N, S, S, 3), N captions) with the sigmoid loss;
    returns the SigLIP. A step's batch is a pure function of (seed, step)."""
    from vlmfast.models.tokenizer import word_tokenizer
    from vlmfast.train.trainer import Trainer, TrainConfig

    if images.ndim != 4 or images.shape[1:] != (architecture.image_size, architecture.image_size, 3):
        raise ValueError(f"images: expected uint8 (N, {architecture.image_size}, {architecture.image_size}, 3), "
                         f"got {tuple(images.shape)}")
    context = 2 + max(len(c.split()) for c in captions)
    tokenizer = word_tokenizer(caption_vocabulary(), context_length=context)
    ids, mask = tokenizer(list(captions))  # padded to the context: SigLIP pools the last position
    torch.manual_seed(seed)
    model = tower_siglip(architecture, tokenizer.vocab_size, context)
    pixels_all = torch.from_numpy(images)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    n = len(images)

    def batches(step, micro):
        per_epoch = max(1, n // batch_size)
        epoch, slot = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch, 7]).permutation(n)
        index = torch.from_numpy(order[slot * batch_size:(slot + 1) * batch_size])
        pixels = (pixels_all[index].permute(0, 3, 1, 2).float() / 255 - mean) / std
        return pixels, ids[index], mask[index]

    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=0.05, warmup_steps=max(1, steps // 15), min_lr_ratio=0.02)
    every = max(1, steps // 5)

    def progress(trainer):
        if log is not None and (trainer.step % every == 0 or trainer.step == steps):
            log(f"vision tower: step {trainer.step}/{steps}  sigmoid loss {trainer.losses[-1]:.4f}")

    Trainer(model, cfg, batches).fit(callback=progress)
    return model.eval()


def vision_tower_state(siglip) -> dict[str, torch.Tensor]:
    """The SigLIP's vision transformer as a state dict of SmolVLM's model.vision_model (the
    attention-pooling head left out)."""
    return {name: tensor.detach().clone() for name, tensor in siglip.vision_model.state_dict().items()
            if not name.startswith(HEAD_PREFIX)}
