"""`vlmfast eval zeroshot|retrieval|vqa|caption` and `vlmfast dedup`: the runners on checkpoint folders."""

import argparse
import json
from pathlib import Path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5 on a folder per class")
    _add_model(zeroshot)
    zeroshot.add_argument("--data", required=True, help="a folder with one sub-folder of images per class")
    zeroshot.add_argument("--template", action="append", default=None,
                          help="prompt template with {} for the class name (repeatable; default 'a photo of a {}.')")
    retrieval = tasks.add_parser("retrieval", help="image<->text Recall@K on COCO / Flickr30k-style JSON")
    _add_model(retrieval)
    retrieval.add_argument("--annotations", required=True, help="COCO captions or Karpathy-split JSON")
    retrieval.add_argument("--images", required=True, help="the folder the JSON's file names are relative to")
    retrieval.add_argument("--split", default="test", help="Karpathy split to use (default test; 'all' for every image)")
    retrieval.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    add_generative_tasks(tasks)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="CLIP or SigLIP checkpoint folder (Hugging Face layout)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--report", type=Path, default=None, help="write the JSON report here too")


def run_eval(args: argparse.Namespace) -> int:
    if args.task in ("vqa", "caption"):  # generative: a SmolVLM pipeline is the model
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

    common = dict(batch_size=args.batch_size, report=args.report)
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
    """`eval vqa` and `eval caption`: a SmolVLM checkpoint through vlmfast.pipeline."""
    vqa = tasks.add_parser("vqa", help="VQA accuracy of a SmolVLM checkpoint (VQA v2 questions + annotations JSON)")
    _add_vlm(vqa, max_new_tokens=10)
    vqa.add_argument("--questions", required=True,
                     help="VQA questions JSON {questions: [{question_id, image_id, question}]}")
    vqa.add_argument("--annotations", required=True,
                     help="VQA annotations JSON {annotations: [{question_id, answers}]}")
    vqa.add_argument("--images", required=True, help="the image folder")
    vqa.add_argument("--image-file", default="COCO_val2014_{image_id:012d}.jpg",
                     help="image file name from image_id (default: VQA v2 val names)")
    vqa.add_argument("--prompt", default="{question}\nAnswer the question using a single word or phrase.",
                     help="prompt with {question} (default asks for a short answer)")
    caption = tasks.add_parser("caption",
                               help="BLEU / CIDEr-D / ROUGE-L of a SmolVLM checkpoint on COCO-style captions")
    _add_vlm(caption, max_new_tokens=32)
    caption.add_argument("--annotations", required=True, help="COCO captions or Karpathy-split JSON")
    caption.add_argument("--images", required=True, help="the folder the JSON's file names are relative to")
    caption.add_argument("--split", default="test", help="Karpathy split to use (default test; 'all' for every image)")
    caption.add_argument("--prompt", default="Describe this image in one sentence.")


def _add_vlm(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    parser.add_argument("--model", required=True, help="SmolVLM / SmolVLM2 / Idefics3 checkpoint folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--report", type=Path, default=None, help="write the JSON report here too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_generative_eval(args: argparse.Namespace) -> int:
    from vlmfast.eval import runners
    from vlmfast.pipelines import pipeline

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected a positive int, got {args.max_new_tokens}")
    generate = pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    common = dict(batch_size=args.batch_size, report=args.report, show_progress=not args.quiet)
    if args.task == "vqa":
        report = runners.run_vqa(generate, args.questions, args.annotations, args.images,
                                 image_file=args.image_file, prompt=args.prompt, **common)
    else:
        split = None if args.split == "all" else args.split
        report = runners.run_caption(generate, args.annotations, args.images, prompt=args.prompt, split=split, **common)
    print(json.dumps(report, indent=2))
    return 0


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--max-distance", type=int, default=4, help="Hamming distance of 64-bit phashes (default 4)")
    parser.add_argument("--no-recursive", action="store_true", help="only the folder itself")
    parser.add_argument("--report", type=Path, default=None, help="write the groups (JSON) here too")


def run_dedup(args: argparse.Namespace) -> int:
    from vlmfast.data import dedup_folder

    result = dedup_folder(args.folder, args.max_distance, recursive=not args.no_recursive)
    text = result.to_json()
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0
