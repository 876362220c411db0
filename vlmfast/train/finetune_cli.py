"""`vlmfast finetune --model DIR --data FILE.jsonl --out DIR [options]`: arguments and run.

Re-running the same command after an interruption resumes from the checkpoint in --out. Data
parallel: `torchrun --nproc-per-node N -m vlmfast.cli finetune ...` (--batch-size a multiple of N).
"""

import argparse
import json

from vlmfast.train.finetune import FinetuneConfig, finetune


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    p.add_argument("--model", required=True, help="SmolVLM checkpoint folder (Hugging Face layout, with tokenizer)")
    p.add_argument("--data", required=True, help="JSONL: {'images': [...], 'messages': [...]} per line "
                                                 "(image paths relative to the file)")
    p.add_argument("--out", required=True, help="output folder: checkpoint, metrics.jsonl, then the merged model")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate, cosine decay after the warmup (default {defaults.lr})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"examples per micro-batch, over all ranks under torchrun (default {defaults.batch_size})")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per step (default 1)")
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup (default 0)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's, on matrices (default 0)")
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0 (default): full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="default 0")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated Linear names, e.g. q_proj,v_proj (default: every attention and MLP Linear)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    p.add_argument("--freeze-decoder", action="store_true", help="do not train the decoder layers")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--base-dtype", default=defaults.base_dtype, choices=["float32", "bfloat16"],
                   help="dtype of the frozen base weights; bfloat16 halves their memory (needs --lora-rank and --bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="update each weight inside the backward and drop its gradient at once (less memory); "
                        "no gradient clipping, needs --grad-accum 1 and one process")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (default 0: only at the end)")
    p.add_argument("--max-length", type=int, default=None,
                   help="most tokens of an example: longer ones are cut at the end (never inside an image; "
                        "an example that cannot be cut is an error)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="data order and LoRA init (default 0)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the final report (JSON)")


def run_finetune(args) -> int:
    options = {name: getattr(args, name) for name in (
        "steps", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "lora_rank", "lora_alpha",
        "lora_dropout", "lora_targets", "freeze_vision", "freeze_decoder", "bf16", "base_dtype",
        "gradient_checkpointing", "optimizer_in_backward", "checkpoint_every", "max_length", "seed", "device",
        "threads")}
    if args.optimizer_in_backward:  # the CLI's clipping (FinetuneConfig's default) needs every gradient first
        options["max_grad_norm"] = None
    log = None if args.quiet else (lambda message: print(message, flush=True))
    report = finetune(args.model, args.data, args.out, log=log, **options)
    if args.quiet and report is not None:  # None: a torchrun rank other than 0 (rank 0 reports)
        print(json.dumps(report, indent=2))
    return 0
