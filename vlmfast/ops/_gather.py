"""All-gather with gradient, for losses computed over the global batch of a process group.

Forward: every rank's (B, D) features, concatenated in rank order -> (world * B, D).
Backward: the gathered gradient is all-reduced (summed over ranks), divided by world, and each
rank keeps its own rows. So rank r's features get d/d(x_r) of (1/world) sum_k L_k, L_k being the
loss rank k computed from the gathered batch; all ranks compute the same global loss L, so with
the same upstream gradient everywhere this is exactly dL/d(x_r).
"""

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.world, ctx.rank, ctx.rows = group, world, rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        grad.div_(ctx.world)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def _check_same_shape(group, x: torch.Tensor) -> None:
    """Every rank must pass the same (B, D): all_gather needs equal pieces."""
    shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    for rank, other in enumerate(shapes):
        if not torch.equal(other, shape):
            raise ValueError(
                f"image_features: expected the same (B, D) on every rank of the group, got "
                f"{tuple(x.shape)} here and {tuple(other.tolist())} on rank {rank}"
            )


def all_gather_with_grad(group, image_features: torch.Tensor, text_features: torch.Tensor):
    """(world * B, D) image and text features of the whole group, differentiable (see above)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: expected a process group of an initialised torch.distributed, but it is not initialised")
    _check_same_shape(group, image_features)
    # One collective for both: the pair travels as (B, 2D).
    both = _AllGatherWithGrad.apply(torch.cat((image_features, text_features), dim=1), group)
    D = image_features.shape[1]
    return both[:, :D], both[:, D:]
