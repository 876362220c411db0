"""Contrastive training of CLIP / SigLIP: AdamW, linear warmup + cosine decay, optional bf16
autocast, gradient accumulation, atomic checkpoints with exact resume, a JSONL metrics log.

Exact resume rests on two choices: the batch of a step is a pure function of the step number
(`batches(step, micro)`, never an iterator's hidden position), and the learning rate is a pure
function of the step (no scheduler state). The checkpoint then needs only the step, the model,
AdamW's state and the RNG states, and a resumed run repeats the uninterrupted one bit for bit.

Data parallel (torchrun): when torch.distributed is initialised with more than one rank, each
rank trains on its shard of every step's batch (the model and its loss under torch's
DistributedDataParallel, or sharded by FSDP2 with cfg.fsdp: vlmfast.train.distributed), a loss_fn
with a `group` keyword (contrastive_loss) computes the loss over the global batch, and only rank 0
writes checkpoints and the log. The checkpoint keeps every rank's RNG state, so resume stays exact.
FSDP2 checkpoints are sharded (torch.distributed.checkpoint: each rank writes its shards, in a
folder named by the step that trainer_state.pt points to once it is complete).
"""

import contextlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmfast import _atomic, ops
from vlmfast.models.layers import set_gradient_checkpointing
from vlmfast.train import distributed
from vlmfast.train.adamw_in_backward import AdamWInBackward

CHECKPOINT_NAME = "trainer_state.pt"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 1/100


def check_optimizer_in_backward(optimizer_in_backward: bool, max_grad_norm, grad_accum: int) -> None:
    """AdamW in the backward updates each weight as soon as its gradient is complete: no clipping
    (it needs every gradient first) and no accumulation (each backward would update)."""
    if optimizer_in_backward and max_grad_norm is not None:
        raise ValueError(f"max_grad_norm: expected None with optimizer_in_backward (clipping needs every gradient "
                         f"before the first update), got {max_grad_norm}")
    if optimizer_in_backward and grad_accum != 1:
        raise ValueError(f"grad_accum: expected 1 with optimizer_in_backward (each backward updates the weights), "
                         f"got {grad_accum}")


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_accum: int = 1
    max_grad_norm: float | None = None
    bf16: bool = False  # torch.autocast(bfloat16) around the forward
    gradient_checkpointing: bool = False  # recompute encoder layers in the backward (less memory)
    # AdamW applied to each parameter inside the backward, its gradient dropped at once
    # (vlmfast.train.adamw_in_backward): the step never holds every gradient. The same update;
    # no gradient clipping, no accumulation, no data parallel (they need every gradient first).
    optimizer_in_backward: bool = False
    # Under torchrun: parameters, gradients and AdamW state sharded over the ranks (FSDP2,
    # torch.distributed.fsdp.fully_shard) instead of a replica per rank (DDP); for models that do
    # not fit one device. Checkpoints are then sharded (torch.distributed.checkpoint).
    fsdp: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0: only at the end
    log_path: str | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: expected at least 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: expected at least 1, got {self.grad_accum}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps: expected 0 <= warmup_steps <= steps={self.steps}, got {self.warmup_steps}")
        check_optimizer_in_backward(self.optimizer_in_backward, self.max_grad_norm, self.grad_accum)
        if self.fsdp and self.optimizer_in_backward:
            raise ValueError("fsdp: not with optimizer_in_backward (the sharded gradients are reduced after the "
                             "backward)")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(model, pixel_values, input_ids, attention_mask=None, *, group=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, or SigLIP's sigmoid loss when the model has a logit_bias.
    group: a process group (data parallel): the loss of the global batch gathered from every
    rank, with gradients such that their average over the ranks is the global gradient."""
    img = model.encode_image(pixel_values).float()
    txt = model.encode_text(input_ids, attention_mask).float()
    if group is not None:
        context = distributed.current(group)
        img, txt = distributed.global_loss_features(img, context), distributed.global_loss_features(txt, context)
    scale = model.logit_scale.float().exp().reshape(())
    if getattr(model, "logit_bias", None) is not None:
        return ops.siglip_loss(img, txt, scale, model.logit_bias.float().reshape(()), group=group)
    return ops.infonce_loss(img, txt, scale, group=group)


def _takes_group(loss_fn) -> bool:
    try:
        return "group" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def _param_groups(model, weight_decay: float):
    """Decay matrices only: biases, norms, scales and 1-d embeddings are left alone (open_clip)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def atomic_torch_save(obj, target: Path) -> None:
    """torch.save through a temporary file and a rename, with the umask's mode (vlmfast._atomic)."""
    _atomic.atomic_write(target, lambda tmp: torch.save(obj, tmp))


class Trainer:
    """trainer = Trainer(model, cfg, batches); trainer.fit() -> list of per-step losses.

    batches(step, micro) -> (pixel_values, input_ids, attention_mask or None) for micro-batch
    `micro` (0 .. grad_accum-1) of `step`. loss_fn(model, *batch) -> scalar, contrastive_loss
    by default. A checkpoint in cfg.checkpoint_dir is resumed from automatically.

    Data parallel (torch.distributed initialised, `group` or the whole world with > 1 rank):
    batches returns the step's global batch and each rank keeps its rows (distributed.shard), or,
    with batches_are_local=True, already returns this rank's shard (trainer.parallel.rank /
    .world say which). A loss_fn with a `group` keyword gets the group; any other loss_fn is a
    per-rank loss whose gradients are averaged. is_main (default: rank 0) writes checkpoints and
    the log; every rank must call fit() alike (the collectives are in step) and see
    cfg.checkpoint_dir (one machine or a shared file system): every rank resumes from it.
    """

    def __init__(self, model, cfg: TrainConfig, batches, *, loss_fn=contrastive_loss, is_main: bool | None = None,
                 group=None, batches_are_local: bool = False):
        self.model, self.cfg, self.batches, self.loss_fn = model, cfg, batches, loss_fn
        self.parallel = distributed.current(group)
        self.is_main = self.parallel.is_main if is_main is None else is_main
        self.batches_are_local = batches_are_local
        self._loss_kwargs = {"group": self.parallel.group} if self.parallel.enabled and _takes_group(loss_fn) else {}
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        if cfg.optimizer_in_backward and self.parallel.enabled:
            raise ValueError("optimizer_in_backward: not with data parallel (the gradients are averaged over the "
                             "ranks after the backward, when the weights would already be updated)")
        # the model and its loss as one module with a forward, which DDP / FSDP2 wrap (rank 0's
        # weights reach every rank there: identical replicas before the first step)
        self.step_module = distributed.LossModule(model, loss_fn, self._loss_kwargs)
        self.sharded = bool(cfg.fsdp and self.parallel.enabled)
        self.replicated: list = []  # parameters FSDP2 leaves whole (scalars)
        if self.sharded:
            self.step_module, self.replicated = distributed.fully_shard_model(self.step_module, self.parallel)
        elif self.parallel.enabled:
            self.step_module = distributed.data_parallel(self.step_module, self.parallel)
        # torch's fused AdamW on the CPU too (several times the for-each one's speed there); the
        # for-each one over FSDP2's sharded parameters
        first = next(model.parameters())
        fused = {"fused": True} if first.device.type in ("cpu", "cuda") and first.is_floating_point() \
            and not self.sharded else {}
        adamw = AdamWInBackward if cfg.optimizer_in_backward else torch.optim.AdamW
        self.optimizer = adamw(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               **fused)
        self.step = 0
        self.losses: list[float] = []
        if cfg.checkpoint_dir and (Path(cfg.checkpoint_dir) / CHECKPOINT_NAME).is_file():
            self.load_checkpoint()

    # -------------------------------------------------------------------------- state
    def full_state_dict(self) -> dict:
        """The model's whole state dict on every rank (FSDP2's shards gathered), on the CPU."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload would leave the other ranks an empty dict: gathered everywhere, then moved
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "losses": self.losses,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": asdict(self.cfg),
        }

    def _rng_states_of_every_rank(self) -> list:
        """[(cpu, cuda states)] of every rank in rank order (a collective under data parallel)."""
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        if not self.parallel.enabled:
            return [mine]
        states = [None] * self.parallel.world
        torch.distributed.all_gather_object(states, mine, group=self.parallel.group)
        return states

    def save_checkpoint(self) -> None:
        if not self.cfg.checkpoint_dir:
            return
        rng_states = self._rng_states_of_every_rank()  # every rank takes part, only is_main writes
        if self.sharded:
            return self._save_sharded(rng_states)
        if self.is_main:
            folder = Path(self.cfg.checkpoint_dir)
            folder.mkdir(parents=True, exist_ok=True)
            state = self.state_dict()
            state["rng_per_rank"] = rng_states
            atomic_torch_save(state, folder / CHECKPOINT_NAME)
        distributed.barrier(self.parallel)  # the file exists for every rank once anyone goes on

    def _save_sharded(self, rng_states) -> None:
        """FSDP2: every rank writes its shards of the model and AdamW into sharded-step-N/ (DCP);
        then is_main points trainer_state.pt at it and removes the older folders."""
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = Path(self.cfg.checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"sharded-step-{self.step:08d}"
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / name),
                 process_group=self.parallel.group)
        distributed.barrier(self.parallel)
        if self.is_main:
            state = {"step": self.step, "losses": self.losses, "sharded": name, "rng_per_rank": rng_states,
                     "rng_cpu": rng_states[0][0], "rng_cuda": rng_states[0][1], "config": asdict(self.cfg)}
            atomic_torch_save(state, folder / CHECKPOINT_NAME)
            for old in folder.glob("sharded-step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier(self.parallel)

    def _load_sharded(self, name: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(Path(self.cfg.checkpoint_dir) / name), process_group=self.parallel.group)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def load_checkpoint(self) -> None:
        state = torch.load(Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        if bool(state.get("sharded")) != self.sharded:
            raise ValueError(f"checkpoint_dir: {self.cfg.checkpoint_dir} holds a "
                             f"{'sharded (fsdp)' if state.get('sharded') else 'whole'} checkpoint; resume it with "
                             f"fsdp={bool(state.get('sharded'))}")
        if self.sharded:
            self._load_sharded(state["sharded"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        rng_cpu, rng_cuda = state["rng_cpu"], state["rng_cuda"]
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.parallel.world:  # the same world size: each rank its own stream back
            rng_cpu, rng_cuda = per_rank[self.parallel.rank]
        torch.set_rng_state(rng_cpu)
        if rng_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_cuda)
        self.step, self.losses = state["step"], list(state["losses"])
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drops log lines of steps after the checkpoint: the resumed run writes them again."""
        if not (self.cfg.log_path and self.is_main and Path(self.cfg.log_path).is_file()):
            return
        lines = Path(self.cfg.log_path).read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) < self.step]
        Path(self.cfg.log_path).write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        if self.cfg.log_path and self.is_main:
            Path(self.cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.cfg.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------------------- loop
    def train_step(self) -> float:
        cfg, model = self.cfg, self.model
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = self.batches(self.step, micro)
            if not self.batches_are_local:
                batch = distributed.shard(batch, self.parallel)
            device_type = next(model.parameters()).device.type
            # data parallel: the ranks' gradients are averaged in the last micro-batch's backward
            with self._gradient_sync(micro == cfg.grad_accum - 1):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = self.step_module(*batch) / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
        if self.sharded:
            distributed.average_replicated_gradients(self.replicated, self.parallel)
        total = distributed.mean_over_ranks(total, self.parallel, next(model.parameters()).device)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            clip = distributed.clip_sharded_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(model.parameters(), cfg.max_grad_norm))
        if not self.cfg.optimizer_in_backward:  # else the backward has stepped and dropped the gradients
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "logit_scale"):
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        self.losses.append(total)
        record = {"step": self.step - 1, "loss": total, "lr": lr, "time": time.time()}
        if hasattr(model, "logit_scale"):
            record["logit_scale"] = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self._log(record)
        return total

    def _gradient_sync(self, last: bool):
        """Gradients reduced over the ranks in this backward only when `last` (accumulation)."""
        if self.sharded:
            self.step_module.set_requires_gradient_sync(last)
        elif self.parallel.enabled and not last:
            return self.step_module.no_sync()
        return contextlib.nullcontext()

    def fit(self, *, stop_at: int | None = None, callback=None) -> list[float]:
        """Trains from the current step to cfg.steps (or to stop_at, to simulate an interruption);
        callback(trainer) runs after each step. Returns every step's loss since step 0."""
        end = self.cfg.steps if stop_at is None else min(stop_at, self.cfg.steps)
        while self.step < end:
            self.train_step()
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if callback is not None:
                callback(self)
        if self.step == self.cfg.steps:
            self.save_checkpoint()
        return self.losses
