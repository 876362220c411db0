"""The training stages of the LLaVA and BLIP-2 papers, as freezing and LoRA on vlmfast's models.

  LLaVA stage 1 (feature alignment, on image-caption pairs): only the projector learns; the CLIP
      tower, the decoder and the embeddings are frozen.
  LLaVA stage 2 (visual instruction tuning): the projector and LoRA adapters on every attention
      and MLP Linear of the decoder (the LoRA variant of LLaVA-1.5's stage 2) learn.
  BLIP-2 stage 1 (the Q-Former's generative training, vision-to-language): the learnt queries,
      the Q-Former and the language projection learn; the ViT, the OPT decoder and the
      embeddings are frozen.

    model = Llava.from_pretrained(path)
    apply_stage(model, 2, lora_rank=8)        # then train model.loss on instruction batches
"""

from __future__ import annotations

from torch import nn

from vlmfast.train.freeze import freeze

# the decoder's Linear layers LoRA adapts in LLaVA's stage 2 (Hugging Face / peft names)
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = {"llava": (1, 2), "blip-2": (1,)}


def family_of(model: nn.Module) -> str | None:
    from vlmfast.models.blip2 import Blip2
    from vlmfast.models.llava import Llava

    return "llava" if isinstance(model, Llava) else "blip-2" if isinstance(model, Blip2) else None


def check_stage(model_type: str, stage: int) -> None:
    """ValueError naming `stage` when the family has no such stage (0: no recipe, always fine)."""
    if stage == 0:
        return
    if model_type not in STAGES:
        raise ValueError(f"stage: training stages are LLaVA's (1, 2) and BLIP-2's (1); this checkpoint is "
                         f"model_type {model_type!r} (use the freeze / LoRA options instead)")
    if stage not in STAGES[model_type]:
        raise ValueError(f"stage: expected one of {STAGES[model_type]} for {model_type}, got {stage}")


def apply_stage(model: nn.Module, stage: int, *, lora_rank: int = 8, lora_alpha: float | None = None,
                lora_dropout: float = 0.0, lora_targets=None) -> int:
    """Freezes `model` (a Llava or a Blip2) for the stage and, for LLaVA's stage 2, adds LoRA
    adapters (rank lora_rank, alpha lora_alpha or 2 x rank) to the decoder. Returns the number of
    scalar parameters that still learn."""
    from vlmfast.train.lora import apply_lora

    family = family_of(model)
    if family is None:
        raise ValueError(f"stage: training stages are LLaVA's and BLIP-2's, the model is a {type(model).__name__}")
    check_stage(family, stage)
    if family == "llava" and stage == 2:
        if lora_rank < 1:
            raise ValueError(f"lora_rank: LLaVA's stage 2 trains LoRA adapters on the decoder, expected a positive "
                             f"rank, got {lora_rank}")
        # apply_lora freezes every other parameter: the projector is unfrozen after
        apply_lora(model, rank=lora_rank, alpha=lora_alpha or 2.0 * lora_rank, dropout=lora_dropout,
                   targets=lora_targets or DECODER_TARGETS, include="language_model")
        for param in model.parts()["connector"]:
            param.requires_grad_(True)
    else:  # LLaVA stage 1, BLIP-2 stage 1: the connector alone
        for param in model.parameters():
            param.requires_grad_(True)
        freeze(model, vision=True, decoder=True, embeddings=True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
