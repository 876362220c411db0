"""Plain-PyTorch references of every vlmfast op.

They are the test oracle (run in float64) and the fallback for anything the kernels do not
accelerate. Written for clarity, not speed: each follows the formula in API.md line by line.
"""

import torch


# ----------------------------------------------------------------------------- rotary embedding

def _table_view(table: torch.Tensor, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """(L, half) viewed so it broadcasts against x[..., :half] with L at seq_dim."""
    trailing = x.dim() - 1 - seq_dim - 1  # dims between the sequence and the head dim
    return table.reshape(table.shape[0], *([1] * trailing), table.shape[1])


def apply_rotary_emb(x, cos, sin, interleaved: bool = False, seq_dim: int = -2) -> torch.Tensor:
    """out_a = x_a cos - x_b sin, out_b = x_b cos + x_a sin over the pairs (a, b) of the first
    R = 2 * cos.shape[-1] head dims; dims from R on pass through. Computed in the promoted dtype
    of x and the tables, returned in x's dtype."""
    seq_dim = seq_dim % x.dim()
    half = cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    c = _table_view(cos, x, seq_dim).to(compute)
    s = _table_view(sin, x, seq_dim).to(compute)
    rotated, rest = x[..., : 2 * half].to(compute), x[..., 2 * half :]
    if interleaved:
        xa, xb = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((xa * c - xb * s, xb * c + xa * s), dim=-1).flatten(-2)
    else:
        xa, xb = rotated[..., :half], rotated[..., half:]
        out = torch.cat((xa * c - xb * s, xb * c + xa * s), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def rotary_table_grads(grad, x, half: int, interleaved: bool = False, seq_dim: int = -2):
    """Gradients of apply_rotary_emb with respect to cos and sin, float32 (or float64) (L, half):
    d cos = sum g_a x_a + g_b x_b, d sin = sum g_b x_a - g_a x_b over every dim but L and the pair."""
    seq_dim = seq_dim % x.dim()
    compute = torch.promote_types(x.dtype, torch.float32)
    g, v = grad[..., : 2 * half].to(compute), x[..., : 2 * half].to(compute)
    if interleaved:
        ga, gb, xa, xb = g[..., 0::2], g[..., 1::2], v[..., 0::2], v[..., 1::2]
    else:
        ga, gb, xa, xb = g[..., :half], g[..., half:], v[..., :half], v[..., half:]
    reduce = [d for d in range(x.dim() - 1) if d != seq_dim]
    d_cos = (ga * xa + gb * xb).sum(dim=reduce)
    d_sin = (gb * xa - ga * xb).sum(dim=reduce)
    return d_cos, d_sin


def rope_2d_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Qwen2-VL's vision frequencies for one axis, float32 (head_dim / 4,), formed with the same
    float32 operations as transformers so the tables agree with it to the last bit."""
    width = head_dim // 2
    exponents = torch.arange(0, width, 2, dtype=torch.float32, device=device) / width
    return 1.0 / (theta**exponents)


def rope_2d(positions, head_dim: int, theta: float = 10000.0, dtype=torch.float32):
    """(cos, sin), each (N, head_dim / 2): angles [row * inv_freq, col * inv_freq]."""
    inv_freq = rope_2d_inv_freq(head_dim, theta, positions.device).to(dtype)
    angles = (positions.to(dtype)[:, :, None] * inv_freq).flatten(1)  # (N, 2 * head_dim / 4)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------- patch embedding

def normalize_images(images, mean=None, std=None, dtype=None) -> torch.Tensor:
    """uint8 (B, H, W, C) or float (B, C, H, W) -> float (B, C, H, W) in `dtype` (default: the
    images' float dtype, float32 for uint8): uint8 is scaled by 1/255; then (x - mean) / std per
    channel when mean/std (length C) are given."""
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).to(dtype or torch.float32) / 255.0
    else:
        x = images.to(dtype or images.dtype)
    if mean is not None:
        shape = (1, -1, 1, 1)
        x = (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)) / torch.as_tensor(
            std, dtype=x.dtype, device=x.device
        ).view(shape)
    return x


def patch_embed(images, weight, bias=None, mean=None, std=None) -> torch.Tensor:
    """(B, N, D) = conv2d(normalised, weight, bias, stride=p).flatten(2).transpose(1, 2), computed
    in weight's dtype; weight (D, C, p, p)."""
    x = normalize_images(images, mean, std, weight.dtype)
    patch = weight.shape[-1]
    return torch.nn.functional.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C * p * p): one row per patch in raster order, columns ordered
    (c, i, j) like a flattened Conv2d weight (D, C, p, p)."""
    b, c, h, w = x.shape
    rows = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return rows.reshape(b * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(rows: torch.Tensor, batch: int, channels: int, height: int, width: int, patch: int):
    """The inverse of patchify: (B * N, C * p * p) -> (B, C, H, W)."""
    grid = rows.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def patch_gather(images, patch: int, scale, shift, dtype) -> torch.Tensor:
    """Normalised patches (B * N, C * p * p) in `dtype`: x * scale[c] + shift[c], x the raw
    image value (uint8 (B, H, W, C) or float (B, C, H, W))."""
    x = images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images
    compute = torch.promote_types(scale.dtype, torch.float32)
    x = x.to(compute) * scale.to(compute).view(1, -1, 1, 1) + shift.to(compute).view(1, -1, 1, 1)
    return patchify(x, patch).to(dtype)
