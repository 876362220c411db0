"""What CLIP and SigLIP share: a forward over both towers and the checkpoint round trip.

A subclass defines `config_class`, `encode_image`, `encode_text` and `logits(image_embeds,
text_embeds) -> (logits_per_image, logits_per_text)`.
"""

from torch import nn

from vlmfast.models import checkpoint
from vlmfast.models.layers import set_gradient_checkpointing


class DualEncoder(nn.Module):
    config_class: type

    def forward(self, pixel_values, input_ids, attention_mask=None):
        return self.logits(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    def set_gradient_checkpointing(self, enable: bool = True):
        """Recompute each encoder layer's activations in the backward (both towers) instead of
        keeping them; same loss and gradients, less memory. Returns self."""
        return set_gradient_checkpointing(self, enable)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None):
        """Loads the transformers checkpoint directory of this model (config.json + safetensors,
        sharded too), strictly: every missing, unexpected or mis-shaped key is an error."""
        config = cls.config_class.from_hf(checkpoint.read_config(path))
        return checkpoint.build_pretrained(cls, config, path, device=device, dtype=dtype)

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None) -> None:
        """Writes a directory the matching transformers model's from_pretrained loads."""
        checkpoint.save_checkpoint(path, self.config.to_hf(), self, max_shard_bytes=max_shard_bytes)
