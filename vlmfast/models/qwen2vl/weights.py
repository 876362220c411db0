"""Qwen2-VL checkpoint keys <-> this package's module names.

Checkpoints come in two layouts, both of which transformers 5 loads:
  hub / saved      visual.*, model.* (the decoder), lm_head.weight
  transformers 5   model.visual.*, model.language_model.*, lm_head.weight (its module tree)
vlmfast's modules follow the second. Loading renames the first into it; saving writes the first,
as transformers' own save_pretrained does. Beyond names, two fusions (weights_io reads them
straight into place): the decoder's q/k/v into self_attn.qkv, and every gate/up pair (decoder,
Qwen2.5-VL vision MLP) into mlp.gate_up. The vision attention's qkv is fused in the checkpoint.
"""

from vlmfast.models.smolvlm.model import fuse_gate_up, split_gate_up


def to_native(state: dict) -> dict:
    """Checkpoint keys (either layout) -> ours."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key[len("model."):]
        out[key] = value
    return fuse_gate_up(out)


def to_checkpoint(state: dict, q_rows: int, kv_rows: int) -> dict:
    """Ours -> the hub layout, q/k/v and gate/up split back, each tensor contiguous and owning
    its memory (safetensors refuses shared storage). q_rows / kv_rows: H*E and Hkv*E."""
    out = {}
    for key, value in split_gate_up(state).items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        prefix, _, kind = key.rpartition(".")
        owner, _, name = prefix.rpartition(".")
        if name == "qkv" and owner.endswith("self_attn"):
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.split((q_rows, kv_rows, kv_rows))):
                out[f"{owner}.{part}.{kind}"] = chunk.detach().clone().contiguous()
        else:
            out[key] = value.detach().clone().contiguous()
    return out

