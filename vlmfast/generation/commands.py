"""`vlmfast generate`: one image + prompt -> the answer on stdout, or a JSONL batch of requests
-> a JSONL of results, resumable (ids already answered in --out are skipped).

    vlmfast generate --model DIR --image cat.jpg --prompt "What is this?"
    vlmfast generate --model DIR --requests requests.jsonl --out results.jsonl

Each request line: {"id": str | int, "prompt": str, "image": path} or "images": [paths] (none:
text only); relative image paths are read from --image-root (default: the requests file's folder).
Each result line: {"id", "output"}, or {"id", "error"} for a request that could not be answered.

Before the model loads, every request line is checked and every image of the requests still to do
is decoded once; all the problems are reported together. With --skip-bad-inputs (the default) a
request whose image cannot be read gets an error line and the others go on; with
--no-skip-bad-inputs nothing is generated until they are fixed. A rerun answers the requests with
no output line yet, the failed ones included (their error lines are replaced). The exit status is
1 when requests were to be answered and none was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmfast import _atomic, _jsonl, cli_args

MAX_LISTED = 20


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=cli_args.vlm_checkpoint,
                        help=f"{cli_args.VLM_FAMILIES} checkpoint folder")
    parser.add_argument("--image", action="append", default=None, type=cli_args.existing_file,
                        help="image file (repeatable: several images)")
    parser.add_argument("--prompt", default=None, help="the user's text (single mode)")
    parser.add_argument("--requests", type=cli_args.existing_file, default=None,
                        help="JSONL of {id, image|images, prompt} (batch mode)")
    parser.add_argument("--out", type=cli_args.output_file, default=None,
                        help="JSONL results of batch mode: {id, output} or {id, error} (appended; resumable)")
    parser.add_argument("--image-root", type=cli_args.existing_dir, default=None,
                        help="folder of relative image paths in --requests (default: the requests file's folder)")
    parser.add_argument("--max-new-tokens", type=cli_args.positive_int, default=64)
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=8)
    parser.add_argument("--device", type=cli_args.device, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--skip-bad-inputs", action=argparse.BooleanOptionalAction, default=True,
                        help="a request whose image cannot be read gets an {id, error} line and the others go on "
                             "(default); --no-skip-bad-inputs: report every bad request and generate nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is drawn on a terminal only)")


def _listing(headline: str, problems: list[str]) -> str:
    lines = [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join([headline, *lines])


def read_requests(path: Path, image_root: Path) -> list[dict]:
    """[{"id", "images": [Path], "prompt", "where"}]; one ValueError naming the line of every bad
    request (and the first line that is not JSON)."""
    requests, seen, problems = [], set(), []
    for where, entry in _jsonl.records(path, errors=problems):
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a JSON object {{id, image|images, prompt}}")
            continue
        rid, prompt = entry.get("id"), entry.get("prompt")
        images = entry.get("images", [entry["image"]] if "image" in entry else [])
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            problems.append(f"{where}: 'id' must be a string or an int, got {rid!r}")
        elif rid in seen:
            problems.append(f"{where}: duplicate id {rid!r}")
        elif not isinstance(prompt, str):
            problems.append(f"{where}: 'prompt' must be a string, got {prompt!r}")
        elif not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            problems.append(f"{where}: 'image' must be a path or 'images' a list of paths")
        else:
            requests.append({"id": rid, "images": [image_root / i for i in images], "prompt": prompt,
                             "where": where})
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            seen.add(rid)
    if problems:
        raise ValueError(_listing(f"--requests: {len(problems)} bad request line(s):", problems))
    if not requests:
        raise ValueError(f"--requests: {path} holds no requests")
    return requests


def read_done(path: Path) -> set:
    """Ids already answered in a results file. Error lines are dropped from the file (those
    requests are asked again), and so is a last line cut short by an interrupted write."""
    if not path.is_file():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done, kept = set(), []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            rid = record["id"]
            answered = "output" in record
        except (json.JSONDecodeError, KeyError, TypeError):
            if number != len(lines):
                raise ValueError(f"--out: {path}:{number}: not a result line {{id, output}}; fix or remove the file") \
                    from None
            continue  # cut short by an interruption
        if answered:
            done.add(rid)
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        _atomic.write_text(path, "".join(kept))
    return done


def check_images(requests: list[dict], *, show_progress: bool) -> dict:
    """{id: "images[k] <path>: <reason>"} of the requests with an image that cannot be read; every
    distinct image decoded once."""
    from vlmfast.eval._progress import Progress
    from vlmfast.models.image_inputs import read_images

    paths = list(dict.fromkeys(str(p) for r in requests for p in r["images"]))
    bad = {}
    with Progress(len(paths), "checking images", unit="images", enabled=show_progress) as bar:
        for start in range(0, len(paths), 64):
            bad.update(read_images(paths[start:start + 64])[2])
            bar.update(len(paths[start:start + 64]))
    failed = {}
    for request in requests:
        for k, image in enumerate(request["images"]):
            if str(image) in bad:
                failed[request["id"]] = f"images[{k}] {image}: {bad[str(image)]}"
                break
    return failed


def run_generate(args: argparse.Namespace) -> int:
    batch_mode = args.requests is not None
    if batch_mode == (args.prompt is not None):
        raise cli_args.usage_error("--prompt/--requests", "give exactly one: --prompt (single mode) or --requests "
                                                          "with --out (batch mode)")
    if batch_mode and args.out is None:
        raise cli_args.usage_error("--out", "required with --requests")
    if batch_mode and args.image:
        raise cli_args.usage_error("--image", "single mode only; batch requests name their images")
    if not batch_mode:
        from vlmfast.pipelines import pipeline

        pipe = pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens)
        print(pipe([[str(p) for p in args.image or []]], [args.prompt])[0])
        return 0
    return _run_batch(args)


def _run_batch(args: argparse.Namespace) -> int:
    from vlmfast.train import distributed

    with distributed.session() as parallel:  # under torchrun each rank answers its share (rank_shards.py)
        return _run_batch_rank(args, parallel)


def _run_batch_rank(args: argparse.Namespace, parallel) -> int:
    from vlmfast.eval._progress import Progress
    from vlmfast.generation import rank_shards
    from vlmfast.train import distributed

    requests = read_requests(args.requests, args.image_root or args.requests.parent)
    if parallel.is_main:
        rank_shards.merge(args.out)  # the rank files a crashed split run left
        read_done(args.out)  # error lines and a cut line dropped once, by one rank
    distributed.barrier(parallel)
    done = read_done(args.out)
    todo = [r for r in requests if r["id"] not in done][parallel.rank::parallel.world]
    out_path = rank_shards.shard_path(args.out, parallel.rank) if parallel.enabled else args.out
    failed = check_images(todo, show_progress=not args.quiet) if todo else {}
    if rank_shards.totals([len(failed)], parallel)[0] and not args.skip_bad_inputs and not failed:
        raise ValueError("--requests: another rank found requests whose image cannot be read (its error lists "
                         "them); --skip-bad-inputs answers the others")
    if failed and not args.skip_bad_inputs:
        by_id = {r["id"]: r["where"] for r in todo}
        raise ValueError(_listing(f"--requests: {len(failed)} request(s) have an image that cannot be read "
                                  "(--skip-bad-inputs answers the others):",
                                  [f"{by_id[rid]}: {why}" for rid, why in failed.items()]))
    for rid, why in failed.items():
        print(f"request {rid!r}: {why}", file=sys.stderr)
    good = [r for r in todo if r["id"] not in failed]
    pipe = _pipeline(args) if good else None  # the model loads before --out is touched
    generated, errors = 0, dict(failed)
    if todo:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a", encoding="utf-8") as out, \
                Progress(len(todo), "generate", unit="requests", enabled=not args.quiet) as bar:
            for rid, why in failed.items():
                out.write(json.dumps({"id": rid, "error": why}) + "\n")
            out.flush()
            bar.update(len(failed))
            # continuous batching (vlmfast.serving): --batch-size rows decode together, a finished
            # request's row is taken by the next at once, and each answer is written when done
            for request, answer, error in _engine_answers(pipe, good, args):
                if error is None:
                    out.write(json.dumps({"id": request["id"], "output": answer}) + "\n")
                    generated += 1
                else:
                    out.write(json.dumps({"id": request["id"], "error": error}) + "\n")
                    errors[request["id"]] = error
                    bar.write(f"request {request['id']!r}: {error}")
                out.flush()  # an interruption loses at most the requests in flight
                bar.update(1)
    generated, failures, asked = rank_shards.totals([generated, len(errors), len(todo)], parallel)
    if parallel.enabled:  # every rank's file complete, then rank 0 merges them into --out
        distributed.barrier(parallel)
        if parallel.is_main:
            rank_shards.merge(args.out)
    if not parallel.is_main:
        return 0 if not asked or generated else 1
    print(json.dumps({"requests": len(requests), "skipped": len(requests) - asked, "generated": generated,
                      "failed": failures, "out": str(args.out)}))
    if asked and generated == 0:
        print(f"vlmfast generate: error: none of the {asked} requests could be answered; the reasons are in "
              f"{args.out}", file=sys.stderr)
        return 1
    return 0


def _pipeline(args: argparse.Namespace):
    from vlmfast.pipelines import pipeline

    return pipeline("image-text-to-text", args.model, device=args.device, dtype=args.dtype,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)


def _engine_answers(pipe, requests: list[dict], args: argparse.Namespace):
    """(request, answer, None) or (request, None, error) per request, in completion order, from the
    continuous-batching engine over the pipeline's model and processor (the pipeline's answers)."""
    from vlmfast.serving.batch import answer_requests

    if not requests:  # nothing answerable: no model was loaded
        return []
    return answer_requests(pipe.model, pipe.processor, requests, max_new_tokens=args.max_new_tokens,
                           max_batch=args.batch_size)
