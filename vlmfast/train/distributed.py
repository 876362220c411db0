"""Data parallel training under torchrun: one process per device, each with a full copy of the
model and its shard of every step's batch.

Gradients are averaged over the ranks with one explicit all-reduce per step (after the last
micro-batch), not by DistributedDataParallel: the contrastive losses already reach the other
ranks through their autograd all-gather (vlmfast.ops._gather), and the trainer calls the model's
encode_image / encode_text rather than a forward DDP could hook. Averaging is right for a loss
that each rank computes over its own rows (a per-rank mean); a loss over the global batch (the
InfoNCE / sigmoid losses with group=) hands each rank only its rows' share of the features'
gradient, so `global_loss_features` scales that share by world first (see there).

Every rank must build the same model; `broadcast_state` copies rank 0's parameters and buffers
to the others once, so different seeds or initialisations cannot make them drift apart.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DataParallel:
    """The process group a trainer averages over: rank / world within it (world 1: no group)."""

    group: object = None
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current(group=None) -> DataParallel:
    """The data-parallel context of this process: torch.distributed's `group` (default: the
    whole world) when it is initialised with more than one rank, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "group: expected a process group of an initialised torch.distributed, but it is not initialised"
            )
        return DataParallel()
    group = dist.group.WORLD if group is None else group
    world = dist.get_world_size(group)
    if world == 1:
        return DataParallel()
    return DataParallel(group=group, rank=dist.get_rank(group), world=world)


def init_from_environment() -> DataParallel:
    """Initialises torch.distributed when launched by torchrun (WORLD_SIZE > 1 in the environment)
    and not already done: NCCL when CUDA is there, gloo on the CPU. On CUDA each rank takes the
    device LOCAL_RANK. Returns the context (a single process without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return current()


@contextmanager
def session(threads: int | None = None):
    """with session(threads) as parallel: a command's run under torchrun or alone. Sets torch's
    thread count (None or 0: unchanged) and joins the torchrun process group; on exit restores the
    thread count and destroys the group if this session created it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    already = dist.is_available() and dist.is_initialized()
    finished = False
    try:
        parallel = init_from_environment()
        yield parallel
        finished = True
    finally:
        torch.set_num_threads(previous)
        if not already and dist.is_available() and dist.is_initialized():
            if finished and parallel.enabled:
                # Ranks leave together: gloo aborts a rank that tears its group down while a peer
                # (rank 0 evaluating and saving) still holds the connection. Skipped after an
                # error, where the peers may never arrive and the barrier would hang.
                dist.barrier(group=parallel.group)
            dist.destroy_process_group()


def shard(batch, context: DataParallel):
    """The rank's rows of a global batch: every tensor of `batch` (a tuple; None entries pass
    through) is cut along dim 0 into `world` equal, contiguous parts and part `rank` is kept."""
    if not context.enabled:
        return batch
    out = []
    for index, item in enumerate(batch):
        if item is None:
            out.append(None)
            continue
        rows = item.shape[0]
        if rows % context.world:
            raise ValueError(
                f"batches: expected a batch whose size divides among world={context.world} ranks, got "
                f"{rows} rows in element {index} of the batch"
            )
        local = rows // context.world
        out.append(item[context.rank * local : (context.rank + 1) * local])
    return tuple(out)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def global_loss_features(x: torch.Tensor, context: DataParallel) -> torch.Tensor:
    """x unchanged; its gradient multiplied by world.

    A loss over the gathered global batch gives rank r exactly dL/dx_r, its rows of the global
    gradient: the towers' parameter gradients on the ranks then SUM to dL/dtheta, while the
    parameters used after the gather (logit scale, bias) already hold dL/dtheta on every rank.
    Multiplying the features' gradient by world makes the average over ranks right for both."""
    if not context.enabled or not torch.is_grad_enabled():
        return x
    return _ScaleGradient.apply(x, float(context.world))


# Gradients travel in buckets of at most this many elements (one all-reduce each), so the flat
# copy costs at most one bucket of memory beside the gradients themselves.
BUCKET_ELEMENTS = 1 << 25


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], context: DataParallel) -> None:
    """All-reduces the gradients of `params` to their mean over the ranks: flat buffers of one
    dtype and device, up to BUCKET_ELEMENTS each, one collective per buffer. A parameter without
    a gradient on this rank counts as zeros (every rank must make the same calls in order)."""
    if not context.enabled:
        return
    by_kind: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    buckets = []
    for grads in by_kind.values():
        bucket, size = [], 0
        for g in grads:
            if bucket and size + g.numel() > BUCKET_ELEMENTS:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel()
        buckets.append(bucket)
    for grads in buckets:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=context.group)
        flat.div_(context.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_state(model: nn.Module, context: DataParallel) -> None:
    """Copies rank 0's parameters and buffers to every rank (in place)."""
    if not context.enabled:
        return
    source = dist.get_global_rank(context.group, 0) if context.group is not dist.group.WORLD else 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=source, group=context.group)


def mean_over_ranks(value: float, context: DataParallel, device) -> float:
    """The mean of a per-rank number (the logged loss) over the ranks."""
    if not context.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=context.group)
    return float(t) / context.world


def barrier(context: DataParallel) -> None:
    if context.enabled:
        dist.barrier(group=context.group)
