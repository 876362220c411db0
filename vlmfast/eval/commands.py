"""`vlmfast eval zeroshot|retrieval|vqa|caption` and `vlmfast dedup`: the runners on checkpoint folders."""

import argparse
import json
from pathlib import Path

from vlmfast import cli_args


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5 on a folder per class")
    _add_model(zeroshot)
    zeroshot.add_argument("--data", required=True, type=cli_args.existing_dir,
                          help="a folder with one sub-folder of images per class")
    zeroshot.add_argument("--template", action="append", default=None, type=cli_args.template,
                          help="prompt template with {} for the class name (repeatable; default 'a photo of a {}.')")
    retrieval = tasks.add_parser("retrieval", help="image<->text Recall@K on COCO / Flickr30k-style JSON")
    _add_model(retrieval)
    retrieval.add_argument("--annotations", required=True, type=cli_args.existing_file,
                           help="COCO captions or Karpathy-split JSON")
    retrieval.add_argument("--images", required=True, type=cli_args.existing_dir,
                           help="the folder the JSON's file names are relative to")
    retrieval.add_argument("--split", default="test", help="Karpathy split to use (default test; 'all' for every image)")
    retrieval.add_argument("--ks", type=cli_args.positive_int, nargs="+", default=[1, 5, 10],
                           help="the K of Recall@K (default 1 5 10)")
    add_generative_tasks(tasks)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=cli_args.clip_checkpoint,
                        help="CLIP or SigLIP checkpoint folder (Hugging Face layout)")
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=64)
    parser.add_argument("--device", type=cli_args.device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_report_and_inputs(parser)


def _add_report_and_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=cli_args.output_file, default=None, help="write the JSON report here too")
    parser.add_argument("--skip-bad-inputs", action=argparse.BooleanOptionalAction, default=False,
                        help="evaluate the entries whose image can be read and list the others in the report's "
                             "'failed' (default off: every image is checked before the first batch and all "
                             "problems are reported together; a metric over part of a benchmark is not its number)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is drawn on a terminal only)")


def run_eval(args: argparse.Namespace) -> int:
    if args.task in ("vqa", "caption"):  # generative: an image-text-to-text pipeline is the model
        return run_generative_eval(args)
    from vlmfast.eval import runners
    from vlmfast.models.embedding import load_model
    from vlmfast.models.tokenizer import load_tokenizer
    from vlmfast.processing import image_processor_from_pretrained

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    processor = image_processor_from_pretrained(args.model)
    tokenize = load_tokenizer(args.model)

    def preprocess(image):
        return processor(image).pixel_values[0]

    common = dict(batch_size=args.batch_size, report=args.report, show_progress=not args.quiet,
                  skip_bad_inputs=args.skip_bad_inputs)
    if args.task == "zeroshot":
        templates = args.template or runners.DEFAULT_TEMPLATES
        report = runners.run_zeroshot(model, args.data, preprocess, tokenize, templates=templates, **common)
    else:
        split = None if args.split == "all" else args.split
        report = runners.run_retrieval(model, args.annotations, args.images, preprocess, tokenize,
                                       split=split, ks=tuple(args.ks), **common)
    print(json.dumps(report, indent=2))
    return 0


def add_generative_tasks(tasks) -> None:
    """`eval vqa` and `eval caption`: a vision-language checkpoint through vlmfast.pipeline."""
    vqa = tasks.add_parser("vqa", help="VQA accuracy of a vision-language checkpoint (VQA v2 questions + "
                                       "annotations JSON)")
    _add_vlm(vqa, max_new_tokens=10)
    vqa.add_argument("--questions", required=True, type=cli_args.existing_file,
                     help="VQA questions JSON {questions: [{question_id, image_id, question}]}")
    vqa.add_argument("--annotations", required=True, type=cli_args.existing_file,
                     help="VQA annotations JSON {annotations: [{question_id, answers}]}")
    vqa.add_argument("--images", required=True, type=cli_args.existing_dir, help="the image folder")
    vqa.add_argument("--image-file", default="COCO_val2014_{image_id:012d}.jpg", type=cli_args.fills(image_id=1),
                     help="image file name from image_id (default: VQA v2 val names)")
    vqa.add_argument("--prompt", default="{question}\nAnswer the question using a single word or phrase.",
                     type=cli_args.fills(question="What is this?"),
                     help="prompt with {question} (default asks for a short answer)")
    caption = tasks.add_parser("caption",
                               help="BLEU / CIDEr-D / ROUGE-L of a vision-language checkpoint on COCO-style "
                                    "captions")
    _add_vlm(caption, max_new_tokens=32)
    caption.add_argument("--annotations", required=True, type=cli_args.existing_file,
                         help="COCO captions or Karpathy-split JSON")
    caption.add_argument("--images", required=True, type=cli_args.existing_dir,
                         help="the folder the JSON's file names are relative to")
    caption.add_argument("--split", default="test", help="Karpathy split to use (default test; 'all' for every image)")
    caption.add_argument("--prompt", default="Describe this image in one sentence.")


def _add_vlm(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    parser.add_argument("--model", required=True, type=cli_args.vlm_checkpoint,
                        help=f"{cli_args.VLM_FAMILIES} checkpoint folder")
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=cli_args.positive_int, default=max_new_tokens)
    parser.add_argument("--device", type=cli_args.device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    _add_report_and_inputs(parser)


def run_generative_eval(args: argparse.Namespace) -> int:
    from vlmfast.eval import runners
    from vlmfast.pipelines import pipeline

    def load():
        return pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    generate = _LoadedOnFirstCall(load)  # the runner checks every file first: a bad one costs no model load
    common = dict(batch_size=args.batch_size, report=args.report, show_progress=not args.quiet,
                  skip_bad_inputs=args.skip_bad_inputs)
    if args.task == "vqa":
        report = runners.run_vqa(generate, args.questions, args.annotations, args.images,
                                 image_file=args.image_file, prompt=args.prompt, **common)
    else:
        split = None if args.split == "all" else args.split
        report = runners.run_caption(generate, args.annotations, args.images, prompt=args.prompt, split=split, **common)
    print(json.dumps(report, indent=2))
    return 0


class _LoadedOnFirstCall:
    """generate(images, prompts) whose pipeline is built when it is first called."""

    def __init__(self, load):
        self.load, self.pipe = load, None

    def __call__(self, images, prompts):
        if self.pipe is None:
            self.pipe = self.load()
        return self.pipe(images, prompts)


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    from vlmfast.data.dedup import KEEP_RULE

    parser.add_argument("folder", type=cli_args.existing_dir, help="folder of images (searched recursively)")
    parser.add_argument("--max-distance", type=cli_args.int_in(0, 64, "bits"), default=4,
                        help="Hamming distance of 64-bit phashes, 0 to 64 (default 4)")
    parser.add_argument("--no-recursive", action="store_true", help="only the folder itself")
    parser.add_argument("--report", type=cli_args.output_file, default=None, help="write the groups (JSON) here too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is drawn on a terminal only)")
    parser.description = (parser.description or "") + f". Keeper of each group: {KEEP_RULE}; nothing is deleted."


def run_dedup(args: argparse.Namespace) -> int:
    import sys

    from vlmfast.data import dedup_folder

    try:
        result = dedup_folder(args.folder, args.max_distance, recursive=not args.no_recursive,
                              show_progress=not args.quiet, warn=False)
    except ValueError as error:  # the library names its arguments; the user typed the command's
        message = str(error).replace("max_distance: ", "--max-distance: ", 1).replace("path: ", "FOLDER: ", 1)
        raise ValueError(message) from None
    for path in result.unreadable:
        print(f"skipped {path}: {result.reasons[path]}", file=sys.stderr)
    text = result.to_json()
    if args.report:
        from vlmfast import _atomic

        _atomic.write_text(args.report, text)
    print(text)
    return 0
