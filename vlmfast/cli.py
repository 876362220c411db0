"""The `vlmfast` command.

Each subcommand is one entry of COMMANDS: name -> (help, add_arguments(parser), run(args) -> exit
code). To add one, write those two functions in your module and register them:

    from vlmfast.cli import COMMANDS
    COMMANDS["bench"] = ("run the benchmarks", add_bench_arguments, run_bench)

(or add the entry below; the modules are imported lazily inside `run`, so `vlmfast --help` stays fast).
"""

import argparse
import json
import os
import sys

from vlmfast import cli_args


# ----------------------------------------------------------------------------- demo

def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", choices=("clip", "vlm"), default="clip",
                   help="clip (default): a small CLIP, zero-shot accuracy; vlm: a tiny SmolVLM fine-tuned on shape "
                        "questions, VQA accuracy, a checkpoint for generate / finetune / eval vqa / serve")
    p.add_argument("--out", default=None, type=cli_args.output_dir,
                   help="where the trained model is saved (default ./vlmfast-demo; ./vlmfast-demo-vlm for vlm)")
    p.add_argument("--steps", type=cli_args.positive_int, default=None, help="training steps (default: the full demo)")
    p.add_argument("--batch-size", type=cli_args.positive_int, default=None)
    p.add_argument("--train-images", type=cli_args.positive_int, default=None,
                   help="size of the generated training set (at least --batch-size)")
    p.add_argument("--test-images", type=cli_args.int_in(5, 1_000_000), default=None,
                   help="held-out images for the evaluation (at least 5: Recall@5)")
    p.add_argument("--seed", type=cli_args.non_negative_int, default=0)
    p.add_argument("--threads", type=cli_args.non_negative_int, default=1,
                   help="torch CPU threads (default 1; 0: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the final report (JSON)")


def _run_demo(args) -> int:
    if args.model == "vlm":
        from vlmfast.train.demo_vlm_cli import run_vlm_demo_command

        return run_vlm_demo_command(args)
    from vlmfast.train.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out or "vlmfast-demo", seed=args.seed, threads=args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    for name in ("batch_size", "train_images", "test_images"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.train_images < cfg.batch_size:
        raise cli_args.usage_error("--train-images", f"expected at least the batch size ({cfg.batch_size}), "
                                                     f"got {cfg.train_images}")
    # progress lines are diagnostics (stderr); the report below is the result (stdout)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_demo(cfg, log=log)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.quiet:
        print(json.dumps({k: v for k, v in report.items() if k != "classes"}, indent=2))
    else:
        print(
            f"zero-shot accuracy {report['zero_shot_accuracy']:.1%} over {report['num_classes']} classes "
            f"({report['num_test_images']} held-out images)\n"
            f"image->text R@1 {report['image_to_text']['R@1']:.1%}  R@5 {report['image_to_text']['R@5']:.1%}\n"
            f"text->image R@1 {report['text_to_image']['R@1']:.1%}  R@5 {report['text_to_image']['R@5']:.1%}\n"
            f"trained {report['steps']} steps in {report['train_seconds']:.1f} s ({report['total_seconds']:.1f} s in "
            f"all, with making the data and evaluating); model saved to {report['out']}"
        )
    return 0


# ----------------------------------------------------------------------------- embed / zeroshot

def _add_model_and_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=cli_args.clip_checkpoint,
                   help="checkpoint directory (Hugging Face CLIP or SigLIP layout)")
    p.add_argument("--images", required=True, type=cli_args.existing_path,
                   help="a folder of images (searched recursively), one image file, or a text file with one "
                        "image path per line (relative paths are read against the list's folder)")
    p.add_argument("--batch-size", type=cli_args.positive_int, default=64, help="images per forward (default 64)")
    p.add_argument("--device", type=cli_args.device, default=None, help="e.g. cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_skip_bad_inputs(p, default=True)
    add_quiet(p)


def add_skip_bad_inputs(p: argparse.ArgumentParser, *, default: bool) -> None:
    """--skip-bad-inputs / --no-skip-bad-inputs: one rule for every command that reads many inputs."""
    p.add_argument("--skip-bad-inputs", action=argparse.BooleanOptionalAction, default=default,
                   help="an input that cannot be read gets an error entry (path and reason) and the rest go on; "
                        "with --no-skip-bad-inputs every input is checked before the model loads and all problems "
                        f"are reported together (default: {'on' if default else 'off'})")


def add_quiet(p: argparse.ArgumentParser, help: str = "no progress bar (it is drawn on a terminal only)") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def _add_embed(p: argparse.ArgumentParser) -> None:
    _add_model_and_images(p)
    p.add_argument("--out", required=True, type=cli_args.output_dir,
                   help="output folder: shard-NNNNN.{npy,safetensors} + .paths.txt + .json (its record), manifest.json")
    p.add_argument("--shard-size", type=cli_args.positive_int, default=4096, help="images per output shard (default 4096)")
    p.add_argument("--format", default="npy", choices=["npy", "safetensors"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace the embeddings already in --out (a rerun otherwise continues them, and refuses "
                        "when they were made with another model, format or preprocessing, or from other images)")


def _run_embed(args) -> int:
    from vlmfast.models.embedding import embed_folder

    summary = embed_folder(
        args.model, args.images, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        fmt=args.format, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
        skip_bad_inputs=args.skip_bad_inputs, show_progress=not args.quiet,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "fingerprint"}, indent=2))
    if summary["images"] == 0:
        print(f"vlmfast embed: error: no image could be embedded ({summary['failed_count']} failed; "
              f"see {args.out / 'manifest.json'})", file=sys.stderr)
        return 1
    return 0


def _add_zeroshot(p: argparse.ArgumentParser) -> None:
    _add_model_and_images(p)
    p.add_argument("--labels", required=True, type=cli_args.labels,
                   help="class names: comma-separated, a JSON list, or a file (one name per line, or a JSON list)")
    p.add_argument("--templates", default=None, type=cli_args.templates,
                   help="prompt templates, each with one {} for the label: '|'-separated, a JSON list or a file "
                        "(default: 'a photo of a {}.'); several are averaged (CLIP's prompt ensembling)")
    p.add_argument("--top-k", type=cli_args.positive_int, default=1, help="labels per image, best first (default 1)")
    p.add_argument("--scores", default="probability", choices=["probability", "cosine"],
                   help="probability (default): softmax over the labels of exp(logit_scale) * cosine, as "
                        "open_clip's zero-shot (SigLIP: its sigmoid per label); cosine: the raw similarity")


def _run_zeroshot(args) -> int:
    from vlmfast.models.embedding import zeroshot_folder

    if args.top_k > len(args.labels):
        raise cli_args.usage_error("--top-k", f"expected at most the {len(args.labels)} labels, got {args.top_k}")
    produced = 0
    for row in zeroshot_folder(
        args.model, args.images, args.labels, templates=args.templates, batch_size=args.batch_size,
        top_k=args.top_k, device=args.device, dtype=args.dtype, scores=args.scores,
        skip_bad_inputs=args.skip_bad_inputs, show_progress=not args.quiet,
    ):
        produced += "error" not in row
        print(json.dumps(row), flush=True)
    if produced == 0:
        print("vlmfast zeroshot: error: no image could be classified (every row above is an error)", file=sys.stderr)
        return 1
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    from vlmfast.bench import runner

    runner.add_arguments(p)


def _run_bench(args) -> int:
    from vlmfast.bench import runner

    return runner.run(args)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from vlmfast.eval.commands import add_eval_arguments

    add_eval_arguments(p)


def _run_eval(args) -> int:
    from vlmfast.eval.commands import run_eval

    return run_eval(args)


def _add_dedup(p: argparse.ArgumentParser) -> None:
    from vlmfast.eval.commands import add_dedup_arguments

    add_dedup_arguments(p)


def _run_dedup(args) -> int:
    from vlmfast.eval.commands import run_dedup

    return run_dedup(args)


def _add_generate(p: argparse.ArgumentParser) -> None:
    from vlmfast.generation.commands import add_generate_arguments

    add_generate_arguments(p)


def _run_generate(args) -> int:
    from vlmfast.generation.commands import run_generate

    return run_generate(args)


def _add_finetune(p: argparse.ArgumentParser) -> None:
    from vlmfast.train.finetune_cli import add_finetune_arguments

    add_finetune_arguments(p)


def _run_finetune(args) -> int:
    from vlmfast.train.finetune_cli import run_finetune

    return run_finetune(args)


COMMANDS = {
    "demo": ("train a small CLIP (or, with `vlm`, a tiny SmolVLM) on the built-in shapes data set and report its "
             "accuracy", _add_demo, _run_demo),
    "embed": ("embed a folder of images with a CLIP/SigLIP checkpoint (sharded, resumable)", _add_embed, _run_embed),
    "zeroshot": ("zero-shot classify images with a CLIP/SigLIP checkpoint", _add_zeroshot, _run_zeroshot),
    "bench": ("benchmark the ops and models against their peers (same run, same machine)", _add_bench, _run_bench),
    "eval": ("evaluate a checkpoint: zeroshot / retrieval (CLIP, SigLIP), vqa / caption (SmolVLM, Qwen2-VL, LLaVA, "
             "BLIP-2); JSON report", _add_eval, _run_eval),
    "dedup": ("find near-duplicate images (perceptual hash, Hamming distance)", _add_dedup, _run_dedup),
    "generate": ("generate text from images + a prompt with a SmolVLM, Qwen2-VL, LLaVA or BLIP-2 checkpoint (or a "
                 "resumable JSONL batch)",
                 _add_generate, _run_generate),
    "finetune": ("fine-tune a SmolVLM, Qwen2-VL, LLaVA or BLIP-2 checkpoint on an image-text instruction JSONL "
                 "(LoRA, freezing, resumable)",
                 _add_finetune, _run_finetune),
}


def _add_serve(p: argparse.ArgumentParser) -> None:
    from vlmfast.serving.command import add_serve_arguments

    add_serve_arguments(p)


def _run_serve(args) -> int:
    from vlmfast.serving.command import run_serve

    return run_serve(args)


COMMANDS["serve"] = ("serve a vision-language checkpoint (the families: --model's help) over the OpenAI "
                     "chat-completions API (continuous batching)",
                     _add_serve, _run_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmfast", description="fast vision-language models on PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


# Commands that keep their work when interrupted and continue it when rerun alike.
RESUMABLE = {"embed", "finetune", "generate"}


def main(argv=None) -> int:
    """Runs one command; returns its exit status (0 done, 1 nothing produced or a system error,
    2 bad arguments or input, named; 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad argument, already reported by argparse (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    command = " ".join(str(getattr(args, name)) for name in ("command", "task") if getattr(args, name, None))
    try:
        return args._run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad input, named by the raiser: usage status
        print(f"vlmfast {command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as err:  # the disk or the system said no (permissions, space)
        print(f"vlmfast {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        detail = f" ({stop})" if str(stop) else ""
        again = "; rerun the same command to continue where it stopped" if args.command in RESUMABLE else ""
        print(f"\nvlmfast {command}: interrupted{detail}{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
