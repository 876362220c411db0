"""`vlmfast demo vlm`: the arguments the demo command shares with the CLIP demo, mapped onto
VLMDemoConfig, and what it prints (progress on stderr, the result on stdout)."""

from __future__ import annotations

import json
import shlex
import sys

from vlmfast.train.demo_vlm import VQA_PROMPT, VLMDemoConfig, run_vlm_demo

DEFAULT_OUT = "vlmfast-demo-vlm"


def run_vlm_demo_command(args) -> int:
    """args: the `vlmfast demo` namespace (out, steps, batch_size, train_images, test_images, seed,
    threads, quiet); a None value keeps the VLM demo's default. --steps N runs N steps in each of
    the two stages (defaults: 1000 for the vision tower, 800 for the decoder); --batch-size is the
    decoder stage's."""
    cfg = VLMDemoConfig(out=str(args.out) if args.out is not None else DEFAULT_OUT, seed=args.seed,
                        threads=args.threads)
    if args.steps is not None:  # a quick run: that many steps in each stage
        cfg.steps = cfg.vision_steps = args.steps
    for flag, field in (("batch_size", "batch_size"), ("train_images", "train_examples"),
                        ("test_images", "test_images")):
        if getattr(args, flag, None) is not None:
            setattr(cfg, field, getattr(args, flag))
    cfg.__post_init__()  # the values set above are checked like the defaults
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    report = run_vlm_demo(cfg, log=log)
    if args.quiet:
        print(json.dumps(report, indent=2))
        return 0
    kinds = ", ".join(f"{kind} {value:.0%}" for kind, value in report["per_question_type"].items())
    example = report["examples"][0]
    q = shlex.quote
    print(
        f"VQA accuracy {report['vqa_accuracy']:.1%} on {report['num_questions']} questions about "
        f"{report['num_test_images']} held-out images ({kinds})\n"
        f"e.g. {example['question']} -> {example['answer']}\n"
        f"trained the vision tower {report['vision_steps']} steps ({report['vision_seconds']:.1f} s), then the decoder "
        f"{report['steps']} steps ({report['train_seconds']:.1f} s); {report['total_seconds']:.1f} s in all, with "
        f"making the data and evaluating; model saved to {report['model']}\n"
        f"try:  vlmfast generate --model {q(report['model'])} --image {q(example['image'])} "
        f"--prompt {q(example['question'])}\n"
        f"      vlmfast eval vqa --model {q(report['model'])} --questions {q(report['vqa_questions'])} "
        f"--annotations {q(report['vqa_annotations'])} --images {q(str(report['vqa_images']))} "
        f"--prompt {q(VQA_PROMPT)}"
    )
    return 0
