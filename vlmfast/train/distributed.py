"""Data parallel training under torchrun on torch's own engine: one process per device, each with
its shard of every step's batch.

The trainer calls the model's encode_image / encode_text (or any loss_fn(model, *batch)), not a
forward: `LossModule` makes "model + loss" one module whose forward DistributedDataParallel or
FSDP2 (torch.distributed.fsdp.fully_shard) can wrap. DDP (`data_parallel`) keeps a full replica
per rank and averages the gradients in its overlapped, bucketed all-reduce; FSDP2 (`fully_shard_model`)
shards parameters, gradients and optimizer state over the ranks, for models that do not fit one
device, gathering each layer's weights only for its forward and backward.

Averaging is right for a loss that each rank computes over its own rows (a per-rank mean); a loss
over the global batch (the InfoNCE / sigmoid losses with group=) hands each rank only its rows'
share of the features' gradient, so `global_loss_features` scales that share by world first (see
there). DDP copies rank 0's parameters and buffers to every rank when it wraps the model;
`broadcast_state` does it before FSDP2 shards one (it copies nothing itself).
"""

import gc
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
            # The run's DistributedDataParallel wrapper sits in reference cycles (trainer, hooks)
            # and holds the gloo group: collected at interpreter exit instead, the group's
            # worker threads are torn down after the runtime that joins them, and the rank
            # aborts ("terminate called without an active exception"). Free it here, first.
            gc.collect()
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


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class LossModule(nn.Module):
    """loss_fn(model, *batch, **loss_kwargs) as a module's forward, so that DDP and FSDP2 (which
    hook forward) can wrap a model that is trained through other methods (encode_image, ...)."""

    def __init__(self, model: nn.Module, loss_fn, loss_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.loss_kwargs = dict(loss_kwargs or {})

    def forward(self, *batch) -> torch.Tensor:
        return self.loss_fn(self.model, *batch, **self.loss_kwargs)


def data_parallel(module: LossModule, context: DataParallel) -> nn.Module:
    """module under DistributedDataParallel over context's group (rank 0's state broadcast now).
    find_unused_parameters: a loss need not touch every parameter (a per-rank loss without the
    logit scale; a fine-tuning batch without images)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   process_group=context.group, find_unused_parameters=True)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: every layer of every nn.ModuleList (encoder and
    decoder layers), so at most one layer's weights are gathered at a time."""
    return [layer for m in model.modules() if isinstance(m, nn.ModuleList) for layer in m]


def fully_shard_model(module: LossModule, context: DataParallel) -> tuple[nn.Module, list[nn.Parameter]]:
    """FSDP2 over context's group: each shard unit, then the root. Returns (module, replicated):
    FSDP2 takes no scalar parameters (a logit scale), so those stay whole on every rank and
    `average_replicated_gradients` all-reduces their gradients after the backward."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    broadcast_state(module, context)  # fully_shard shards each rank's own values: make them rank 0's
    device = next(module.parameters()).device
    ranks = dist.get_process_group_ranks(context.group) if context.group is not dist.group.WORLD \
        else list(range(dist.get_world_size()))
    mesh = DeviceMesh.from_group(context.group, device.type, mesh=ranks)
    replicated = [p for p in module.parameters() if p.dim() == 0]
    ignored = set(replicated)
    for unit in shard_units(module.model):
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    fully_shard(module, mesh=mesh, ignored_params=ignored)
    return module, replicated


@torch.no_grad()
def average_replicated_gradients(params: list[nn.Parameter], context: DataParallel) -> None:
    """The mean over the ranks of the gradients of parameters FSDP2 left whole (one all-reduce)."""
    if not context.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.stack([g.reshape(()) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=context.group)
    flat.div_(context.world)
    for p, value in zip(params, flat):
        p.grad = value.reshape(p.shape).clone()


@torch.no_grad()
def clip_sharded_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over FSDP2's sharded gradients and the replicated ones
    together (the norm of the whole gradient, the same scale on every rank). Returns the norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coefficient.to(g.dtype))
    return total


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
