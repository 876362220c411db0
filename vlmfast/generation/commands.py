"""`vlmfast generate`: one image + prompt -> the answer on stdout, or a JSONL batch of requests
-> a JSONL of results, resumable (ids already in --out are skipped).

    vlmfast generate --model DIR --image cat.jpg --prompt "What is this?"
    vlmfast generate --model DIR --requests requests.jsonl --out results.jsonl

Each request line: {"id": str | int, "prompt": str, "image": path} or "images": [paths] (none:
text only); relative image paths are read from --image-root (default: the requests file's folder).
Each result line: {"id", "output"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmfast import _jsonl


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="SmolVLM / SmolVLM2 / Idefics3 checkpoint folder")
    parser.add_argument("--image", action="append", default=None, help="image file (repeatable: several images)")
    parser.add_argument("--prompt", default=None, help="the user's text (single mode)")
    parser.add_argument("--requests", type=Path, default=None, help="JSONL of {id, image|images, prompt} (batch mode)")
    parser.add_argument("--out", type=Path, default=None, help="JSONL results of batch mode (appended; resumable)")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder of relative image paths in --requests (default: the requests file's folder)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_requests(path: Path, image_root: Path) -> list[dict]:
    """[{"id", "images": [Path], "prompt"}]; ValueError naming the line of a bad request."""
    requests, seen = [], set()
    for where, entry in _jsonl.records(path):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object {{id, image|images, prompt}}")
        rid, prompt = entry.get("id"), entry.get("prompt")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ValueError(f"{where}: 'id' must be a string or an int, got {rid!r}")
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {prompt!r}")
        images = entry.get("images", [entry["image"]] if "image" in entry else [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{where}: 'image' must be a path or 'images' a list of paths")
        seen.add(rid)
        requests.append({"id": rid, "images": [image_root / i for i in images], "prompt": prompt})
    return requests


def read_done(path: Path) -> set:
    """Ids already answered in a results file. A last line cut short (an interrupted write) is
    dropped from the file, so the request is asked again."""
    if not path.is_file():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done = set()
    for number, line in enumerate(lines, 1):
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not a result line {{id, output}}; fix or remove the file") from None
            path.write_text("".join(lines[:-1]), encoding="utf-8")
    return done


def run_generate(args: argparse.Namespace) -> int:
    from vlmfast.pipelines import pipeline

    batch_mode = args.requests is not None
    if batch_mode == (args.prompt is not None):
        raise ValueError("--prompt (single mode) or --requests with --out (batch mode): give exactly one")
    if batch_mode and args.out is None:
        raise ValueError("--out: required with --requests")
    if batch_mode and args.image:
        raise ValueError("--image: single mode only; batch requests name their images")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected a positive int, got {args.max_new_tokens}")
    if not batch_mode:
        pipe = pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens)
        print(pipe([args.image or []], [args.prompt])[0])
        return 0

    from vlmfast.eval._progress import progress

    requests = read_requests(args.requests, args.image_root or args.requests.parent)
    done = read_done(args.out)
    todo = [r for r in requests if r["id"] not in done]
    if todo:
        pipe = pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as out:
            for batch in progress(batches, len(batches), "generate", enabled=not args.quiet):
                answers = pipe([r["images"] for r in batch], [r["prompt"] for r in batch])
                for request, answer in zip(batch, answers):
                    out.write(json.dumps({"id": request["id"], "output": answer}) + "\n")
                out.flush()  # a crash loses at most the batch in flight
    print(json.dumps({"requests": len(requests), "skipped": len(requests) - len(todo), "generated": len(todo),
                      "out": str(args.out)}))
    return 0
