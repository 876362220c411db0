"""`vlmfast finetune --model DIR --data FILE.jsonl --out DIR [options]`: arguments and run.

Re-running the same command after an interruption resumes from the checkpoint in --out. Data
parallel: `torchrun --nproc-per-node N -m vlmfast.cli finetune ...` (--batch-size a multiple of N).
"""

import argparse
import json
import sys

from vlmfast import cli_args
from vlmfast.train.finetune import FinetuneConfig, finetune


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    p.add_argument("--model", required=True, type=cli_args.finetune_checkpoint,
                   help=f"{cli_args.VLM_FAMILIES} checkpoint folder (Hugging Face layout, with tokenizer)")
    p.add_argument("--data", required=True, type=cli_args.existing_file,
                   help="JSONL: {'images': [...], 'messages': [...]} per line (image paths relative to the file)")
    p.add_argument("--out", required=True, type=cli_args.output_dir,
                   help="output folder: checkpoint, metrics.jsonl, then the merged model (created once the model loaded)")
    p.add_argument("--steps", type=cli_args.positive_int, default=defaults.steps,
                   help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--lr", type=cli_args.positive_float, default=defaults.lr,
                   help=f"peak learning rate, cosine decay after the warmup (default {defaults.lr})")
    p.add_argument("--batch-size", type=cli_args.positive_int, default=defaults.batch_size,
                   help=f"examples per micro-batch, over all ranks under torchrun (default {defaults.batch_size})")
    p.add_argument("--grad-accum", type=cli_args.positive_int, default=defaults.grad_accum,
                   help="micro-batches per step (default 1)")
    p.add_argument("--warmup-steps", type=cli_args.non_negative_int, default=defaults.warmup_steps,
                   help="linear warmup, at most --steps (default 0)")
    p.add_argument("--weight-decay", type=cli_args.non_negative_float, default=defaults.weight_decay,
                   help="AdamW's, on matrices (default 0)")
    p.add_argument("--lora-rank", type=cli_args.non_negative_int, default=defaults.lora_rank,
                   help="0 (default): full fine-tuning")
    p.add_argument("--lora-alpha", type=cli_args.positive_float, default=None, help="default: 2 x rank")
    p.add_argument("--lora-dropout", type=cli_args.fraction, default=defaults.lora_dropout, help="default 0")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated Linear names, e.g. q_proj,v_proj (default: every attention and MLP Linear)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    p.add_argument("--freeze-decoder", action="store_true", help="do not train the decoder layers")
    p.add_argument("--stage", type=int, choices=[0, 1, 2], default=defaults.stage,
                   help="LLaVA / BLIP-2 recipe: 1 = LLaVA's projector or BLIP-2's Q-Former alone (image-caption "
                        "pairs), 2 = LLaVA's projector + LoRA on the decoder (rank 8 unless --lora-rank); "
                        "0 (default): the freeze / LoRA options")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--base-dtype", default=defaults.base_dtype, choices=["float32", "bfloat16"],
                   help="dtype of the frozen base weights; bfloat16 halves their memory (needs --lora-rank and --bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="update each weight inside the backward and drop its gradient at once (less memory); "
                        "no gradient clipping, needs --grad-accum 1 and one process")
    p.add_argument("--checkpoint-every", type=cli_args.non_negative_int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (default 0: only at the end, and when stopped with Ctrl-C)")
    p.add_argument("--max-length", type=cli_args.int_in(2, 1 << 30), default=None,
                   help="most tokens of an example: longer ones are cut at the end (never inside an image; "
                        "an example that cannot be cut is an error)")
    p.add_argument("--seed", type=cli_args.non_negative_int, default=defaults.seed,
                   help="data order and LoRA init (default 0)")
    p.add_argument("--device", type=cli_args.device, default=None, help="e.g. cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=cli_args.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (the step lines); the report (JSON) is printed on stdout either way")


def run_finetune(args) -> int:
    options = {name: getattr(args, name) for name in (
        "steps", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "lora_rank", "lora_alpha",
        "lora_dropout", "lora_targets", "freeze_vision", "freeze_decoder", "stage", "bf16", "base_dtype",
        "gradient_checkpointing", "optimizer_in_backward", "checkpoint_every", "max_length", "seed", "device",
        "threads")}
    if args.optimizer_in_backward:  # the CLI's clipping (FinetuneConfig's default) needs every gradient first
        options["max_grad_norm"] = None
    if args.warmup_steps > args.steps:
        raise cli_args.usage_error("--warmup-steps", f"expected at most --steps ({args.steps}), got {args.warmup_steps}")
    # step lines are diagnostics (stderr); the report is the result (stdout)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    report = finetune(args.model, args.data, args.out, log=log, show_progress=not args.quiet, **options)
    if report is not None:  # None: a torchrun rank other than 0 (rank 0 reports)
        print(json.dumps(report, indent=2))
    return 0
