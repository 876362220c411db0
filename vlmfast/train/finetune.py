"""`vlmfast finetune`: SmolVLM / Qwen2-VL fine-tuning on an image-text instruction JSONL.

    report = finetune("SmolVLM2-256M-Video-Instruct", "train.jsonl", "out/", steps=200, lora_rank=16)

The glue between the pieces: the data (vlmfast.data.instructions: the JSONL; .instruction_collate:
batches with answer-only labels),
the model (SmolVLM.loss: the fused linear + cross-entropy, no (tokens x vocabulary) logits),
LoRA / freezing (vlmfast.train.lora / freeze) and the Trainer (AdamW, warmup + cosine,
accumulation, bf16 autocast, gradient checkpointing, atomic checkpoints, exact resume).

The out folder holds, as it runs: finetune_config.json (the options: a re-run must match them),
checkpoint/trainer_state.pt (every checkpoint_every steps and at the end), metrics.jsonl (one
line a step); at the end the merged model in Hugging Face layout (config.json, safetensors, the
tokenizer and processor files of the base model) and report.json. Running the same call again
after an interruption resumes from the checkpoint and ends with the same weights, bit for bit.

The batch of a step is a pure function of the step (what exact resume needs): sample k of the
run (k = (step * grad_accum + micro) * batch_size + j) is example order_e[k mod N] of epoch
e = k // N, where order_e is a permutation drawn from (seed, e).

Under torchrun each rank collates its share of every micro-batch and the loss is reweighted to
the global batch's mean (instruction_loss), so N ranks train as one process with the whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmfast import _atomic
from vlmfast.data.instruction_collate import IGNORE_INDEX, InstructionCollator
from vlmfast.data.instructions import check_images, data_sha256, read_instructions
from vlmfast.train import distributed
from vlmfast.train.interrupt import StopAfterStep
from vlmfast.train.trainer import Trainer, TrainConfig, check_optimizer_in_backward

CONFIG_NAME = "finetune_config.json"
# config.json model_types the fine-tuning collates (_collator): SmolVLM / Idefics3, Qwen2-VL / Qwen2.5-VL,
# LLaVA-1.5, BLIP-2
MODEL_TYPES = ("smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "llava", "blip-2")
# Options a resumed run may change: they do not change what is computed (device: only its rounding).
FREE_OPTIONS = ("checkpoint_every", "threads", "device")


@dataclass
class FinetuneConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    lora_rank: int = 0  # 0: full fine-tuning (of the parts not frozen)
    lora_alpha: float | None = None  # None: 2 * rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: vlmfast.train.lora.DEFAULT_TARGETS
    freeze_vision: bool = False
    freeze_decoder: bool = False
    # LLaVA / BLIP-2 recipes (vlmfast.train.recipes): 1 = LLaVA's projector / BLIP-2's Q-Former only,
    # 2 = LLaVA's projector + LoRA on the decoder (rank 8 unless lora_rank says); 0 = none
    stage: int = 0
    bf16: bool = False
    # "bfloat16": the frozen base weights held in bf16 (half their memory; LoRA with bf16 only),
    # the adapters and AdamW's state stay float32
    base_dtype: str = "float32"
    gradient_checkpointing: bool = False
    # AdamW inside the backward, each gradient dropped at once (TrainConfig.optimizer_in_backward):
    # less memory; needs max_grad_norm None and grad_accum 1
    optimizer_in_backward: bool = False
    checkpoint_every: int = 0  # steps; 0: only at the end
    max_length: int | None = None
    seed: int = 0
    device: str | None = None  # None: cuda when available
    threads: int | None = None  # torch CPU threads; None: torch's choice

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank: expected 0 (no LoRA) or a positive rank, got {self.lora_rank}")
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ValueError("lora_alpha, lora_targets: given without lora_rank (set lora_rank > 0 to use LoRA)")
        if self.stage not in (0, 1, 2):
            raise ValueError(f"stage: expected 0 (none), 1 or 2, got {self.stage}")
        if self.stage and (self.freeze_vision or self.freeze_decoder):
            raise ValueError("stage: chooses what is frozen itself; drop freeze_vision / freeze_decoder")
        if self.stage == 1 and self.lora_rank:
            raise ValueError("lora_rank: stage 1 trains the connector alone, no LoRA")
        if self.stage == 2 and self.lora_rank == 0:
            self.lora_rank = 8
        if self.freeze_vision and self.freeze_decoder and self.lora_rank == 0:
            raise ValueError("freeze_vision, freeze_decoder: both frozen without LoRA leaves only the connector and "
                             "embeddings to train; use lora_rank or freeze less")
        check_optimizer_in_backward(self.optimizer_in_backward, self.max_grad_norm, self.grad_accum)
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"base_dtype: expected 'float32' or 'bfloat16', got {self.base_dtype!r}")
        if self.base_dtype == "bfloat16" and not (self.lora_rank and self.bf16):
            raise ValueError("base_dtype: 'bfloat16' needs lora_rank > 0 and bf16 (the frozen base in bf16 under "
                             "bf16 autocast; training bf16 weights themselves would lose AdamW's small updates)")
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t for t in self.lora_targets.split(",") if t)
        elif self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)

    def trajectory(self) -> dict:
        """The options a resumed run must share with the interrupted one."""
        options = dataclasses.asdict(self)
        for name in FREE_OPTIONS:
            options.pop(name)
        options["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return options


class InstructionBatches:
    """batches(step, micro) -> (input_ids, labels, attention_mask, pixel_values, pixel_attention_mask
    or, for Qwen2-VL, image_grid_thw) on `device`: micro-batch `micro` of `step`, a pure function
    of (step, micro) (module docstring).

    batch_size is the global micro-batch; under data parallel (world ranks) this rank collates only
    its contiguous share, rows [rank * batch_size / world, (rank + 1) * batch_size / world)."""

    def __init__(self, examples, collator: InstructionCollator, *, batch_size: int, grad_accum: int, seed: int,
                 device=None, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size: expected a multiple of the {world} data-parallel ranks, got {batch_size}")
        self.examples, self.collator = examples, collator
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device, self.rank, self.world = device, rank, world
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        orders = self._orders  # one local reference: the prefetch thread may replace the cache meanwhile
        if epoch not in orders:
            orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
            self._orders = orders
        return orders[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        first = (step * self.grad_accum + micro) * self.batch_size
        n = len(self.examples)
        return [int(self.order(k // n)[k % n]) for k in range(first, first + self.batch_size)]

    def local_indices(self, step: int, micro: int) -> list[int]:
        local = self.batch_size // self.world
        return self.indices(step, micro)[self.rank * local:(self.rank + 1) * local]

    def __call__(self, step: int, micro: int):
        batch = self.collator([self.examples[i] for i in self.local_indices(step, micro)])
        move = (lambda t: t.to(self.device)) if self.device is not None else (lambda t: t)
        # the model's second vision input: SmolVLM's pixel_attention_mask, Qwen2-VL's image_grid_thw
        second = batch.get("pixel_attention_mask", batch.get("image_grid_thw"))
        return (move(batch["input_ids"]), move(batch["labels"]), move(batch["attention_mask"]),
                move(batch["pixel_values"]) if "pixel_values" in batch else None,
                move(second) if second is not None else None)


class PrefetchedBatches:
    """batches(step, micro) with the next micro-batch collated on a worker thread (images decoded
    and tiled, text rendered and tokenised) while the model trains on this one. `batches` must be a
    pure function of (step, micro): the results are the same as without prefetching, and a call for
    any other key (a resumed run's first step) is simply computed on the spot."""

    def __init__(self, batches, grad_accum: int, steps: int):
        self.batches, self.grad_accum, self.steps = batches, grad_accum, steps  # nothing past step steps-1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmfast-finetune-batches")
        self._pending: dict[tuple[int, int], Future] = {}

    def _following(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)

    def __call__(self, step: int, micro: int):
        future = self._pending.pop((step, micro), None)
        for stale in self._pending.values():
            stale.cancel()
        following = self._following(step, micro)
        self._pending = {following: self._pool.submit(self.batches, *following)} if following[0] < self.steps else {}
        return future.result() if future is not None else self.batches(step, micro)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending = {}
        self._pool.shutdown(wait=True)


def instruction_loss(model, input_ids, labels, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
                     group=None):
    """The model's next-token loss on the labelled (answer) tokens: Trainer's loss_fn. The fifth
    batch entry is the model's second vision input (SmolVLM: pixel_attention_mask; Qwen2-VL:
    image_grid_thw), passed in that place of model.loss.

    group (data parallel, passed by the Trainer): each rank holds a share of the micro-batch and
    its own mean; it is reweighted to sum_rank / count_global * world, so that after the Trainer
    averages the ranks' gradients (and losses) the result is the mean over the global micro-batch's
    answer tokens: what one process with the whole micro-batch computes."""
    # LLaVA / BLIP-2 take no second vision input: attention_mask by name reaches every family
    vision = (pixel_values,) if pixel_attention_mask is None else (pixel_values, pixel_attention_mask)
    loss = model.loss(input_ids, labels, *vision, attention_mask=attention_mask)
    if group is None:
        return loss
    local = (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float64)  # tokens the loss counts (shifted)
    total = local.clone()
    torch.distributed.all_reduce(total, group=group)
    world = torch.distributed.get_world_size(group)
    return loss * (local * world / total).to(loss.dtype)


# What a run is, beyond its options: the base model and the data (hashes, finetune_config.json).
IDENTITY_KEYS = {"model": "another base model (--model)", "data": "other data (--data or its images)"}


def _check_resume(out: Path, current: dict) -> None:
    """A re-run into the same out folder must use the options, the model and the data of the run
    it continues (`current`: the options' trajectory plus IDENTITY_KEYS)."""
    saved_file = out / CONFIG_NAME
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        def change(key):
            if key in IDENTITY_KEYS:
                return IDENTITY_KEYS[key] + ("" if key in saved else " (not recorded by the run that wrote it)")
            return f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        detail = ", ".join(change(k) for k in changed)
        raise ValueError(f"out: {out} holds a run started with other options ({detail}); rerun with the same "
                         "options to resume it, or choose another --out")


def prepare_model(model_dir, cfg: FinetuneConfig, device):
    """The base model in float32 (autocast does the bf16 math) or, with base_dtype="bfloat16", in
    bf16, with LoRA and freezing applied; every trained parameter is float32."""
    from vlmfast.models import checkpoint
    from vlmfast.models.auto import model_class
    from vlmfast.train.freeze import freeze
    from vlmfast.train.lora import DEFAULT_TARGETS, apply_lora

    family = model_class(checkpoint.read_config(model_dir).get("model_type"))  # SmolVLM, Qwen2VL
    model = family.from_pretrained(model_dir, device=device, dtype=getattr(torch, cfg.base_dtype))
    torch.manual_seed(cfg.seed)  # LoRA's A init (and dropout) draw from the seeded generator
    if cfg.stage:
        from vlmfast.train.recipes import apply_stage

        apply_stage(model, cfg.stage, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets)
    elif cfg.lora_rank:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank, dropout=cfg.lora_dropout,
                   targets=cfg.lora_targets or DEFAULT_TARGETS)
    if cfg.freeze_vision or cfg.freeze_decoder:
        freeze(model, vision=cfg.freeze_vision, decoder=cfg.freeze_decoder)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # adapters are made in the base's dtype: AdamW wants float32
    return model.train()


def _collator(model_dir: Path, max_length: int | None):
    """The checkpoint's processor (right padding) inside the collator of its family."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type in ("llava", "blip-2"):
        from vlmfast.processing import blip2, llava, llava_instructions

        if model_type == "llava":
            return llava_instructions.LlavaInstructionCollator(
                llava.LlavaProcessor.from_pretrained(model_dir, padding_side="right"), max_length=max_length)
        return llava_instructions.Blip2InstructionCollator(
            blip2.Blip2Processor.from_pretrained(model_dir, padding_side="right"), max_length=max_length)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from vlmfast.processing.qwen2vl_instructions import Qwen2VLInstructionCollator
        from vlmfast.processing.qwen2vl_processor import Qwen2VLProcessor

        return Qwen2VLInstructionCollator(Qwen2VLProcessor.from_pretrained(model_dir, padding_side="right"),
                                          max_length=max_length)
    from vlmfast.models.smolvlm import SmolVLMProcessor

    return InstructionCollator(SmolVLMProcessor.from_pretrained(model_dir, padding_side="right"), max_length=max_length)


def _progress(log, cfg: FinetuneConfig, started: float, tokens: list[int], first_step: int, stop: StopAfterStep):
    def callback(trainer):
        elapsed = time.perf_counter() - started  # this run's training clock, as report.json's train_seconds
        lr = trainer.optimizer.param_groups[0]["lr"]
        done = trainer.step - first_step
        left = elapsed / done * (cfg.steps - trainer.step) if done else 0.0
        log(f"step {trainer.step}/{cfg.steps}  loss {trainer.losses[-1]:.4f}  lr {lr:.2e}  "
            f"{sum(tokens) / max(elapsed, 1e-9):.0f} tok/s  {elapsed:.1f} s, ETA {left:.0f} s")
        stop.check(trainer)
    return callback


def finetune(model, data, out, *, log=print, show_progress: bool = False, **options) -> dict | None:
    """Fine-tunes the SmolVLM / Qwen2-VL checkpoint folder `model` on the JSONL file `data` and saves
    the result (LoRA merged) in Hugging Face layout in `out`. options: FinetuneConfig's fields. log(str)
    receives a progress line per step (None: silent). Returns the report (also out/report.json).

    Under torchrun (`torchrun --nproc-per-node N -m vlmfast.cli finetune ...`) every rank trains on
    its share of each step's batch (batch_size is the global micro-batch, a multiple of N) and the
    loss is the global batch's; rank 0 alone logs, checkpoints and saves, the others return None.

    Before the model loads, every example is validated and every image decoded once (all problems
    in one ValueError; show_progress: a bar on stderr meanwhile), and a rerun into `out` is checked
    to continue the same run (options, base model and data hashes). `out` is created only once the
    model loaded. Ctrl-C finishes the step, saves a checkpoint and raises KeyboardInterrupt (one
    process); rerunning resumes there."""
    cfg = FinetuneConfig(**options)
    with distributed.session(cfg.threads) as parallel:
        return _finetune(Path(model), data, Path(out), cfg, (log or _silent) if parallel.is_main else _silent,
                         parallel, show_progress and parallel.is_main)


def _silent(message: str) -> None:
    pass


def _finetune(model_dir: Path, data, out: Path, cfg: FinetuneConfig, log, parallel,
              show_progress: bool = False) -> dict | None:
    from vlmfast.models.fingerprint import fingerprint
    from vlmfast.train.lora import lora_layers, merge_lora

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model: expected a SmolVLM or Qwen2-VL checkpoint folder with config.json, "
                                f"got {model_dir}")
    if cfg.batch_size % parallel.world:
        raise ValueError(f"batch_size: expected a multiple of the {parallel.world} torchrun ranks, "
                         f"got {cfg.batch_size}")
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's LOCAL_RANK
    else:
        device = torch.device("cpu")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; expected a folder")
    examples = read_instructions(data)
    check_images(examples, show_progress=show_progress)  # a corrupt image now, not at the step that draws it
    collator = _collator(model_dir, cfg.max_length)
    run = {**cfg.trajectory(), "model": fingerprint(model_dir, preprocessor=False), "data": data_sha256(data, examples)}
    _check_resume(out, run)
    model = prepare_model(model_dir, cfg, device)

    out.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to load leaves no folder behind
    distributed.barrier(parallel)  # every rank has read the old options before rank 0 writes them
    if parallel.is_main:
        _atomic.write_text(out / CONFIG_NAME, json.dumps(run, indent=2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ranks = f" x {parallel.world} ranks" if parallel.enabled else ""
    log(f"{len(examples)} examples, {trainable:,} of {total:,} parameters trained, {cfg.steps} steps of "
        f"{cfg.batch_size * cfg.grad_accum} examples on {device}{ranks}")

    batches = PrefetchedBatches(InstructionBatches(
        examples, collator, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed, device=device,
        rank=parallel.rank, world=parallel.world), cfg.grad_accum, cfg.steps)
    tokens: list[int] = []

    def counted(step, micro):  # the progress line's tokens/s: real (unpadded) tokens, rank 0's x world
        batch = batches(step, micro)
        tokens.append(int(batch[2].sum()) * parallel.world)
        return batch

    train_cfg = TrainConfig(
        steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
        warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        optimizer_in_backward=cfg.optimizer_in_backward,
        checkpoint_dir=str(out / "checkpoint"), checkpoint_every=cfg.checkpoint_every,
        log_path=str(out / "metrics.jsonl"),
    )
    trainer = Trainer(model, train_cfg, counted, loss_fn=instruction_loss, batches_are_local=True)
    resumed_from = trainer.step
    if resumed_from:
        log(f"resuming from the checkpoint at step {resumed_from}")
    started = time.perf_counter()
    try:
        with StopAfterStep(enabled=not parallel.enabled, log=log) as stop:
            losses = trainer.fit(callback=_progress(log, cfg, started, tokens, resumed_from, stop))
    finally:
        batches.close()
    seconds = time.perf_counter() - started
    if not parallel.is_main:
        return None

    model.eval()
    if lora_layers(model):
        merge_lora(model)
    model.save_pretrained(out, processor_from=model_dir)
    report = {
        "out": str(out), "steps": cfg.steps, "resumed_from": resumed_from, "examples": len(examples),
        "world_size": parallel.world, "trainable_parameters": trainable, "parameters": total,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_seconds": seconds, "tokens_per_second": sum(tokens) / seconds if seconds > 0 and tokens else None,
    }
    _atomic.write_text(out / "report.json", json.dumps(report, indent=2))
    log(f"saved to {out} (loss {report['first_loss']:.4f} -> {report['last_loss']:.4f})")
    return report


__all__ = ["FinetuneConfig", "InstructionBatches", "finetune", "instruction_loss", "prepare_model"]
