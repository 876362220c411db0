"""Dynamic resolution: images of any size (multiples of the patch) -> patch tokens with their
(row, col) positions, several images packed into one variable-length batch.

    packed = pack_images([img_a, img_b], weight, bias, mean=MEAN, std=STD)
    cos, sin = ops.rope_2d(packed.positions, head_dim)                 # (T, head_dim / 2)
    q = ops.apply_rotary_emb(q, cos, sin, seq_dim=0)                   # q: (T, H, E)
    out = ops.attention_varlen(q, k, v, packed.cu_seqlens, packed.max_seqlen)

Token order within an image:
- "raster" (default): row by row, as patch_embed returns them (ViT, SigLIP-NaFlex, SmolVLM).
- "merge2x2": each 2x2 block of neighbouring patches is 4 consecutive tokens, blocks in raster
  order (Qwen2-VL's vision tower, whose patch merger then reshapes (T, D) to (T / 4, 4 D)). Needs
  an even number of patch rows and columns.
The positions always follow the tokens, so rope_2d gives each token its own (row, col) angles in
either order.
"""

from dataclasses import dataclass

import torch

from vlmfast.ops import _checks
from vlmfast.ops.patch_embed import patch_embed

ORDERS = ("raster", "merge2x2")


@dataclass
class PackedPatches:
    """Patch tokens of n images packed back to back.

    tokens: (T, D), T = sum of h_i * w_i patches, in weight's dtype.
    positions: int64 (T, 2), the (row, col) of each token in its image's patch grid.
    cu_seqlens: int32 (n + 1,), cumulative token counts starting at 0 (image i is
        tokens[cu_seqlens[i]:cu_seqlens[i + 1]]).
    max_seqlen: the largest h_i * w_i.
    grid_sizes: the (h_i, w_i) patch grid of each image.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    grid_sizes: list[tuple[int, int]]


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")


def token_order(rows: int, cols: int, order: str = "raster", device=None) -> torch.Tensor:
    """int64 (rows * cols,): the raster index of each token in `order`."""
    _check_order(order)
    index = torch.arange(rows * cols, device=device)
    if order == "raster":
        return index
    if rows % 2 or cols % 2:
        raise ValueError(f"order: 'merge2x2' needs an even patch grid, got {rows} x {cols} patches")
    # (rows, cols) -> (rows/2, 2, cols/2, 2) -> blocks (rows/2, cols/2) of 2 x 2 in raster order
    return index.view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).flatten()


def grid_positions(rows: int, cols: int, order: str = "raster", device=None) -> torch.Tensor:
    """int64 (rows * cols, 2): the (row, col) of each token of a rows x cols grid in `order`."""
    raster = token_order(rows, cols, order, device)
    return torch.stack((raster // cols, raster % cols), dim=1)


def _patch_grid(name: str, image, patch: int) -> tuple[int, int]:
    """(H / p, W / p) of one uint8 (H, W, C) or float (C, H, W) image."""
    _checks.tensor(name, image)
    if image.dim() != 3:
        layout = "(H, W, C) uint8" if image.dtype == torch.uint8 else "(C, H, W) float"
        raise ValueError(f"{name}: expected one image {layout}, got {_checks.shape_of(image)}")
    height, width = (image.shape[0], image.shape[1]) if image.dtype == torch.uint8 else (image.shape[1], image.shape[2])
    if height % patch or width % patch:
        raise ValueError(
            f"{name}: H and W must be multiples of the patch size p = {patch}, got H = {height}, W = {width}"
        )
    return height // patch, width // patch


def patchify_image(image, weight, bias=None, *, mean=None, std=None, order: str = "raster"):
    """One image of any size -> (tokens (N, D), positions int64 (N, 2)).

    image: uint8 (H, W, C) as decoded or float (C, H, W); H, W multiples of p. The other
    arguments are patch_embed's; `order` as in the module docstring.
    """
    if not isinstance(image, torch.Tensor):
        _checks.tensor("image", image)
    packed = pack_images([image], weight, bias, mean, std, order=order)
    return packed.tokens, packed.positions


def pack_images(images, weight, bias=None, mean=None, std=None, *, order: str = "raster") -> PackedPatches:
    """Images of different sizes -> one packed batch of patch tokens for attention_varlen.

    Arguments:
        images: a non-empty list of uint8 (H_i, W_i, C) or float (C, H_i, W_i) images, each
            H_i, W_i a multiple of p (sizes may all differ).
        weight, bias, mean, std: as patch_embed (weight (D, C, p, p)).
        order: "raster" or "merge2x2" (see the module docstring).
    Returns:
        PackedPatches(tokens (T, D), positions int64 (T, 2), cu_seqlens int32 (n + 1,),
        max_seqlen, grid_sizes). Images of equal size and type run as one patch_embed batch.
    """
    _check_order(order)
    if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)) or not images:
        raise TypeError("images: expected a non-empty list of (H, W, C) uint8 or (C, H, W) float images")
    _checks.floating("weight", weight)
    _checks.rank("weight", weight, 4, "(D, C, p, p) like a Conv2d weight")
    patch = weight.shape[-1]
    grids = [_patch_grid(f"images[{i}]", image, patch) for i, image in enumerate(images)]
    device = weight.device
    orders = [token_order(rows, cols, order, device) for rows, cols in grids]  # checks the grids

    # One patch_embed call per (size, dtype) group; patch_embed validates every image.
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((tuple(image.shape), image.dtype), []).append(i)
    per_image: list[torch.Tensor | None] = [None] * len(images)
    for members in groups.values():
        batch = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]].unsqueeze(0)
        tokens = patch_embed(batch, weight, bias, mean=mean, std=std)
        for slot, i in enumerate(members):
            per_image[i] = tokens[slot]

    lengths = [rows * cols for rows, cols in grids]
    if order != "raster":
        per_image = [tokens[index] for tokens, index in zip(per_image, orders)]
    positions = torch.cat([grid_positions(r, c, order, device) for r, c in grids])
    cu_seqlens = torch.zeros(len(images) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return PackedPatches(
        tokens=torch.cat(per_image), positions=positions, cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths), grid_sizes=grids,
    )
