"""The Qwen2-VL / Qwen2.5-VL vision tower on vlmfast ops: every image of a batch in one packed
sequence, no padding, no mask.

    flattened patches (T, C * tp * p * p) --patch GEMM--> (T, D)
    [Qwen2.5: reorder into windows]
    blocks: norm -> qkv GEMM -> attention_varlen(cu_seqlens, rotary=rope_2d tables) -> proj
            norm -> MLP (Qwen2-VL: fc1 + quick_gelu fused, fc2; Qwen2.5-VL: SwiGLU)
    merger: norm, m^2 neighbouring tokens -> one (a view), GEMM + GELU, GEMM -> (T / m^2, D_text)
    [Qwen2.5: merged tokens put back in processor order]

The patch embedding is transformers' Conv3d with kernel = stride = (tp, p, p) over patches the
processor has already cut out: one GEMM with the weight seen as (D, C * tp * p * p). Attention
segments are frames (cu_seqlens) or Qwen2.5's windows (cu_window_seqlens), each segment attending
to itself only, inside one attention_varlen call with the rotary fused: no per-image loop, no
(S x S) mask. Module names follow transformers' (patch_embed.proj, blocks.N.attn.qkv, merger.mlp.0).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmfast import ops
from vlmfast.models import _ops
from vlmfast.models.qwen2vl.config import Qwen2VLVisionConfig
from vlmfast.models.qwen2vl.layout import VisionLayout, vision_layout
from vlmfast.models.smolvlm.decoder import RMSNorm


def _norm(cfg: Qwen2VLVisionConfig, size: int, **kw) -> nn.Module:
    # Qwen2-VL: LayerNorm; Qwen2.5-VL: RMSNorm; both eps 1e-6 as transformers hard-codes it
    if cfg.version == "qwen2_vl":
        return nn.LayerNorm(size, eps=1e-6, **kw)
    return RMSNorm(size, 1e-6, **kw)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel, stride=kernel, bias=False, **kw)

    def flat_weight(self) -> torch.Tensor:
        """The Conv3d weight as (D, C * tp * p * p), a view. In inference the same view object
        is handed out while the weight stays in place, so that ops.linear's packed copy (cached
        per weight tensor) is reused from call to call."""
        weight = self.proj.weight
        if torch.is_grad_enabled():
            return weight.view(weight.shape[0], -1)
        cached = self.__dict__.get("_flat")
        if cached is None or cached[0] is not weight or cached[1].data_ptr() != weight.data_ptr() \
                or cached[1].dtype != weight.dtype:
            cached = (weight, weight.detach().view(weight.shape[0], -1))
            self.__dict__["_flat"] = cached
        return cached[1]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(T, C * tp * p * p) in the processor's (C, tp, p, p) order -> (T, D)."""
        weight = self.flat_weight()
        return ops.linear(patches.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, **kw)
        self.proj = nn.Linear(cfg.width, cfg.width, **kw)

    def forward(self, x, cu_seqlens, max_seqlen: int, rotary) -> torch.Tensor:
        T, D = x.shape
        # (T, 3, H, E): q, k, v are strided views, read in place by the kernel
        q, k, v = _ops.linear(x, self.qkv).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        out = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, rotary=rotary)
        return _ops.linear(out.reshape(T, D), self.proj)


class VisionMLP(nn.Module):
    """Qwen2-VL's fc1 -> act -> fc2, the activation fused into fc1's GEMM where ops.linear has it."""

    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden, **kw)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width, **kw)
        self.fused = _ops.FUSED_ACTIVATIONS.get(cfg.hidden_act)
        if self.fused is None:
            from vlmfast.models.layers import activation

            self.act = activation(cfg.hidden_act)

    def forward(self, x):
        if self.fused is not None:
            return _ops.linear(_ops.linear(x, self.fc1, self.fused), self.fc2)
        return _ops.linear(self.act(_ops.linear(x, self.fc1)), self.fc2)


class VisionSwiGLU(nn.Module):
    """Qwen2.5-VL's down(act(gate(x)) * up(x)), gate and up as one GEMM (checkpoint keys
    gate_proj / up_proj are fused on load and split on save)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        from vlmfast.models.layers import activation

        self.hidden = cfg.mlp_hidden
        self.act = F.silu if cfg.hidden_act == "silu" else activation(cfg.hidden_act)
        self.gate_up = nn.Linear(cfg.width, 2 * cfg.mlp_hidden, **kw)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.width, **kw)

    def forward(self, x):
        gate_up = _ops.linear(x, self.gate_up)
        if self.act is F.silu:  # (Qwen2.5-VL's): the fused op
            return _ops.linear(_ops.swiglu(gate_up), self.down_proj)
        gate, up = gate_up.split(self.hidden, dim=-1)
        hidden = self.act(gate)
        # without autograd, up is multiplied into the activation in place: one (T, I) buffer
        # fewer to allocate and fault in (the product over strided halves costs ~3x otherwise)
        hidden = hidden * up if hidden.requires_grad else hidden.mul_(up)
        return _ops.linear(hidden, self.down_proj)


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.width, **kw)
        self.norm2 = _norm(cfg, cfg.width, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = VisionMLP(cfg, **kw) if cfg.version == "qwen2_vl" else VisionSwiGLU(cfg, **kw)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, (cos, sin))
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, **kw):
        super().__init__()
        self.merged = cfg.width * cfg.merge_unit
        self.ln_q = _norm(cfg, cfg.width, **kw)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged, **kw), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_size, **kw))

    def forward(self, x):
        x = self.ln_q(x).view(-1, self.merged)  # m^2 consecutive tokens side by side: a view
        return _ops.linear(_ops.linear(x, self.mlp[0], "gelu"), self.mlp[2])


class VisionTower(nn.Module):
    """pixel_values (T, C * tp * p * p) + grid_thw [(t, h, w)] -> (T / m^2, D_text) features in
    the processor's order (image by image, frame by frame, merged token by merged token)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nn.ModuleList(VisionBlock(cfg, **kw) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, **kw)
        # set_gradient_checkpointing(model, True): each block recomputed in the backward
        self.gradient_checkpointing = False

    def layout(self, grid_thw: list[tuple[int, int, int]], device=None) -> VisionLayout:
        cfg = self.config
        side = cfg.window_merged if cfg.version == "qwen2_5_vl" else None
        return vision_layout(grid_thw, cfg.spatial_merge_size, side, device=device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        cfg = self.config
        layout = self.layout(grid_thw, device=pixel_values.device)
        x = self.patch_embed(pixel_values)
        if layout.window_index is not None:
            x = x.view(-1, cfg.merge_unit, x.shape[-1])[layout.window_index].view(x.shape)
        cos, sin = ops.rope_2d(layout.positions, cfg.head_dim, theta=cfg.rope_theta)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if layout.window_index is None or i in cfg.fullatt_block_indexes:
                segments = (layout.cu_seqlens, layout.max_seqlen)
            else:
                segments = (layout.cu_window_seqlens, layout.max_window_seqlen)
            if checkpointing:
                x = checkpoint(block, x, *segments, cos, sin, use_reentrant=False)
            else:
                x = block(x, *segments, cos, sin)
        merged = self.merger(x)
        if layout.window_index is None:
            return merged
        # back from window order: merged token window_index[j] sits at place j
        return merged.new_empty(merged.shape).index_copy_(0, layout.window_index, merged)
