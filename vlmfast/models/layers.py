"""Transformer building blocks shared by every tower: pre-norm blocks with a fused qkv projection.

Module names follow Hugging Face's CLIP/SigLIP encoders (self_attn, layer_norm1, mlp.fc1, ...)
so that checkpoint.py only has to fuse q/k/v; nothing else is renamed.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast.models import _ops


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class SelfAttention(nn.Module):
    """Multi-head self-attention, one (D, 3D) GEMM for q, k and v.

    x: (B, L, D) -> (B, L, D). attn_mask: bool (B, 1, L, L) or (B, 1, 1, L), True takes part.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, device=device, dtype=dtype)
        self.out_proj = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, L, D = x.shape
        # (B, L, 3, H, E) -> three (B, H, L, E) views: no copy before the attention kernel
        qkv = _ops.linear(x, self.qkv)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = _ops.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return _ops.linear(out.transpose(1, 2).reshape(B, L, D), self.out_proj)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, *, device=None, dtype=None):
        super().__init__()
        self.act = activation(act)
        self.fused_act = _ops.FUSED_ACTIVATIONS.get(act)  # None: applied after fc1 by self.act
        self.fc1 = nn.Linear(hidden_size, intermediate_size, device=device, dtype=dtype)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, device=device, dtype=dtype)

    def forward(self, x):
        if self.fused_act is not None:
            return _ops.linear(_ops.linear(x, self.fc1, self.fused_act), self.fc2)
        return _ops.linear(self.act(_ops.linear(x, self.fc1)), self.fc2)


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, hidden_size, num_heads, intermediate_size, act, eps, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.self_attn = SelfAttention(hidden_size, num_heads, **kw)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.mlp = MLP(hidden_size, intermediate_size, act, **kw)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg, *, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(
                cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                cfg.layer_norm_eps, device=device, dtype=dtype,
            )
            for _ in range(cfg.num_hidden_layers)
        )
        # set_gradient_checkpointing(model, True) turns it on: each layer's activations are
        # recomputed in the backward instead of kept (memory for ~1 extra forward).
        self.gradient_checkpointing = False

    def forward(self, x, attn_mask=None, is_causal: bool = False, *, hidden_states=None):
        """x (B, L, D) -> the last layer's output (B, L, D). hidden_states: indices into
        transformers' hidden_states (0: the input, i: layer i's output; negative ones count from
        the end), e.g. (-2,) for LLaVA's penultimate layer: returns a list of those tensors in
        the order asked, and the layers after the deepest one asked do not run."""
        wanted = None
        if hidden_states is not None:
            wanted = resolve_hidden_states(hidden_states, len(self.layers))
            collected = {0: x} if 0 in wanted else {}
        layers = self.layers if wanted is None else self.layers[: max(wanted)]
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(layers, 1):
            if checkpointing:
                x = checkpoint(layer, x, attn_mask=attn_mask, is_causal=is_causal, use_reentrant=False)
            else:
                x = layer(x, attn_mask=attn_mask, is_causal=is_causal)
            if wanted is not None and i in wanted:
                collected[i] = x
        return x if wanted is None else [collected[i] for i in wanted]


def resolve_hidden_states(indices, num_layers: int) -> list[int]:
    """transformers' hidden_states indices (num_layers + 1 of them, negatives from the end) ->
    non-negative ones, in order. ValueError for one out of range."""
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(
                f"hidden_states: expected indices in [-{num_layers + 1}, {num_layers}] (the input and "
                f"{num_layers} layer outputs), got {index!r}"
            )
        resolved.append(index % (num_layers + 1))
    return resolved


def set_gradient_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Checkpoint every layer of every stack in `model` (torch.utils.checkpoint, non-reentrant)
    or stop doing it. Returns model. A stack is an Encoder or any module with a bool
    `gradient_checkpointing` attribute that its forward honours (SmolVLM's Decoder)."""
    encoders = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    if not encoders:
        raise TypeError(
            f"model: expected a module holding an Encoder (CLIP, SigLIP, a tower), got {type(model).__name__}"
        )
    for encoder in encoders:
        encoder.gradient_checkpointing = bool(enable)
    return model


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal Linear/Embedding weights, zero biases, unit LayerNorms (timm's ViT init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
