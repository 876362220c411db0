"""Rotary embedding: vlmfast against the reference and transformers' unfused functions.

The op is memory-bound: GB/s counts reading x and writing the output once (the tables are small
and stay in cache). Peers: transformers' `apply_rotary_pos_emb_vision` (Qwen2-VL: upcast to
float32, rotate_half, cast back) on its (L, E) duplicated tables, and vlmfast's own reference.
"""

import torch

from vlmfast import ops
from vlmfast.bench.timing import Result, time_ms

# (tokens, heads, head_dim): a ViT-B/16 batch, a SigLIP-so400m batch, a Qwen2-VL image.
GPU_CASES = [(64 * 1024, 12, 64), (32 * 729, 16, 72), (16384, 16, 80)]
CPU_CASES = [(8 * 197, 12, 64), (4 * 729, 16, 72)]
QUICK_CASES = [(197, 12, 64)]


def _transformers_vision_rotary():
    try:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    except ImportError:
        return None
    return apply_rotary_pos_emb_vision


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    hf_rotary = _transformers_vision_rotary()
    results = []
    for tokens, heads, head_dim in cases:
        case = f"x=({tokens}, {heads}, {head_dim}) {str(dtype).removeprefix('torch.')}"
        x = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
        side = int(tokens**0.5) + 1
        positions = torch.stack((torch.arange(tokens) // side, torch.arange(tokens) % side), 1).to(device)
        cos, sin = ops.rope_2d(positions, head_dim)
        moved = 2 * x.numel() * x.element_size()

        ms = time_ms(lambda: ops.apply_rotary_emb(x, cos, sin, seq_dim=0), device)
        reference_ms = time_ms(lambda: ops.reference.apply_rotary_emb(x, cos, sin, False, 0), device)
        peer, peer_ms = "reference", reference_ms
        if hf_rotary is not None:
            full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            # transformers rotates q and k in one call: time it on (x, x) and halve.
            peer, peer_ms = "transformers", time_ms(lambda: hf_rotary(x, x, full_cos, full_sin), device) / 2
        results.append(Result("rotary", case, "vlmfast", ms, peer, peer_ms, gbps=moved / ms / 1e6,
                              extra={"reference_ms": reference_ms}))

        grad = torch.randn_like(x)
        xr = x.detach().requires_grad_()

        def fwd_bwd():
            ops.apply_rotary_emb(xr, cos, sin, seq_dim=0).backward(grad)

        def hf_fwd_bwd():
            q, k = hf_rotary(xr, xr, full_cos, full_sin)
            torch.autograd.backward((q, k), (grad, grad))

        ms = time_ms(fwd_bwd, device)
        # Halved like the forward: transformers rotates q and k together.
        peer_ms = time_ms(hf_fwd_bwd, device) / 2 if hf_rotary is not None else None
        results.append(Result("rotary", case + " fwd+bwd", "vlmfast", ms, "transformers" if peer_ms else None,
                              peer_ms, gbps=2 * moved / ms / 1e6))
    return results
