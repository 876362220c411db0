"""Training: the contrastive trainer (vlmfast.train.trainer), the built-in demo (vlmfast.train.demo),
LoRA adapters (vlmfast.train.lora) and freezing parts of a SmolVLM (vlmfast.train.freeze)."""

from vlmfast.train.freeze import freeze, trainable_parameters
from vlmfast.train.lora import DEFAULT_TARGETS, apply_lora, lora_parameters, lora_state_dict, merge_lora
from vlmfast.train.trainer import TrainConfig, Trainer, contrastive_loss, learning_rate
from vlmfast.train.finetune import FinetuneConfig, finetune  # noqa: E402  (SmolVLM fine-tuning)

__all__ = ["Trainer", "TrainConfig", "contrastive_loss", "learning_rate", "apply_lora", "merge_lora",
           "lora_parameters", "lora_state_dict", "DEFAULT_TARGETS", "freeze", "trainable_parameters",
           "finetune", "FinetuneConfig"]
