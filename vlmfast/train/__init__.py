"""Training: the contrastive trainer (vlmfast.train.trainer) and the built-in demo (vlmfast.train.demo)."""

from vlmfast.train.trainer import TrainConfig, Trainer, contrastive_loss, learning_rate

__all__ = ["Trainer", "TrainConfig", "contrastive_loss", "learning_rate"]
