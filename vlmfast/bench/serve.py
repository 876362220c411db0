"""Serving: the continuous-batching engine under a mixed workload against static batching of the
same requests (vlmfast's own batched generate and transformers' generate), in the same run, on
the same random-weight model (SmolVLM2-256M's dimensions; quick: a 2-layer toy).

Workload (fixed seed): prompts of 16-128 text tokens, 40 % with one 512 x 512 image (64 image
tokens) drawn from 4 distinct images (so images repeat), answers of 8-128 tokens from a long-tailed
distribution (stop tokens ignored, so every implementation produces exactly the same tokens).
Static batching runs the requests in arrival order in batches of 32, each batch padded to its
longest prompt and run to its longest answer. Continuous batching: closed-loop clients (1, 8 or
32 threads, each submitting its next request when the last one finished) on one engine.

Cases (ms = milliseconds per generated token, so speedup = ratio of tokens/s):
- continuous c=32 against static b=32 (vlmfast generate, transformers generate) and against c=1;
- c=8 likewise against static b=32;
- time to first token under load: p99 of the c=32 run's requests after each client's first (the
  steady state: the first wave arrives all at once) against the p99 of the c=1 run (each request
  alone: its own prefill);
- a repeated image's prefill (time to first token alone) against its first one, for the image
  request with the shortest prompt asked again with another question of the same length (a short
  question on a picture): with the prefix cache (everything through the image reused) and with the
  encoder cache only (the features reused, the whole prompt prefilled).
extra holds tokens/s, requests/s, TTFT p50/p99 and the peak resident MiB of every run (VmHWM
reset before each; both models are resident throughout). The clients call the engine in-process:
HTTP and the chat template are not part of these numbers.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import threading
import time

import torch

from vlmfast.bench import rss
from vlmfast.bench.smolvlm import FULL, IMAGE_TOKEN, QUICK, build_pair
from vlmfast.bench.timing import Result

ANSWER_LENGTHS = ([8, 16, 32, 64, 128], [0.3, 0.25, 0.2, 0.15, 0.1])
PROMPT_LENGTHS = ([16, 32, 64, 128], [0.3, 0.3, 0.25, 0.15])
IMAGE_SHARE, DISTINCT_IMAGES, STATIC_BATCH = 0.4, 4, 32


def workload(n: int, spec: dict, *, quick: bool, seed: int = 0) -> list[dict]:
    """n requests: {"ids" int64 (L,), "pixels" float (1, 1, 3, S, S) or None, "image" index, "answer" int}."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vision = spec["vision_config"]
    size = vision["image_size"]
    image_tokens = (size // vision["patch_size"] // spec["scale_factor"]) ** 2
    images = [torch.randn(1, 1, 3, size, size, generator=g) for _ in range(DISTINCT_IMAGES)]
    vocab = spec["text_config"]["vocab_size"]
    out = []
    for _ in range(n):
        text = rnd.choices(*PROMPT_LENGTHS)[0]
        answer = rnd.choices(*ANSWER_LENGTHS)[0]
        if quick:
            text, answer = max(4, text // 8), max(2, answer // 16)
        ids = torch.randint(3, min(vocab, 49000), (text,), generator=g)
        image = rnd.randrange(DISTINCT_IMAGES) if rnd.random() < IMAGE_SHARE else None
        if image is not None:
            ids = torch.cat([ids[:5], torch.full((image_tokens,), IMAGE_TOKEN), ids[5:]])
        out.append({"ids": ids, "pixels": None if image is None else images[image], "image": image, "answer": answer})
    return out


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _summary(name, tokens, requests, wall_s, ttfts, peak_mib) -> dict:
    print(f"bench serve: {name}: {tokens} tokens in {wall_s:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "tokens": tokens, "requests": requests, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "requests_per_s": requests / wall_s, "ms_per_token": 1e3 * wall_s / tokens,
            "ttft_p50_ms": 1e3 * _quantile(ttfts, 0.5), "ttft_p99_ms": 1e3 * _quantile(ttfts, 0.99),
            "peak_mib": peak_mib}


def _peak_run(fn):
    """fn() with the resident-memory peak reset first; returns (fn(), peak MiB or None)."""
    try:
        rss.reset_peak()
    except OSError:
        return fn(), None
    value = fn()
    return value, rss.status_mib("VmHWM")


# ----------------------------------------------------------------------------- continuous batching

def _engine(model, spec, requests, *, prefix_cache: bool = True):
    from vlmfast.serving import Engine
    from vlmfast.serving.engine import DEFAULT_PREFIX_CACHE

    need = max(r["ids"].numel() + r["answer"] for r in requests)
    # rows a longest answer longer than the longest request: room for windows of different ages
    return Engine(model, max_batch=32, max_len=need + max(r["answer"] for r in requests), chunk_tokens=256,
                  eos_token_id=[], prefix_cache_bytes=DEFAULT_PREFIX_CACHE if prefix_cache else 0)


def _as_request(r):
    from vlmfast.serving import Request, SamplingParams

    vision = {} if r["pixels"] is None else {"pixel_values": r["pixels"]}
    return Request(r["ids"], vision, SamplingParams(max_tokens=r["answer"], temperature=0, ignore_eos=True))


def continuous(model, spec, requests, clients: int) -> dict:
    """Closed-loop clients on a fresh engine (fresh encoder cache)."""
    engine = _engine(model, spec, requests).start()
    # warm-up (first calls of the kernels) on a text-only request: the encoder cache stays empty
    engine.generate([_as_request(next(r for r in requests if r["pixels"] is None))])
    queue = list(range(len(requests)))
    lock = threading.Lock()
    records = []

    def client(index):
        first = True
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            handle = engine.submit(_as_request(requests[i]))
            handle.done.wait()
            records.append((index, first, handle.first_token_at - handle.arrival, len(handle.tokens)))
            first = False

    def run():
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    wall, peak = _peak_run(run)
    engine.stop()
    tokens = sum(r[3] for r in records)
    summary = _summary(f"continuous c={clients}", tokens, len(records), wall, [r[2] for r in records], peak)
    steady = [r[2] for r in records if not r[1]] or [r[2] for r in records]
    summary["ttft_steady_p99_ms"] = 1e3 * _quantile(steady, 0.99)
    summary["encoder_runs"] = engine.runner.encoder_runs
    return summary


def repeated_image_prefill(model, spec, requests, trials: int = 3) -> dict:
    """Median times to first token, alone, of the image request with the shortest prompt (a short
    question on a picture: the case the caches are for), on a fresh image each trial: "first" (the
    image never seen), "other_question" (the same image, another question of the same length: the
    prefix cache holds everything through the image), "encoder_only" (that again with the prefix
    cache off: the features come from the encoder cache, the whole prompt is prefilled) and
    "same_prompt" (the very same request again: one token runs)."""
    base = min((r for r in requests if r["pixels"] is not None), key=lambda r: r["ids"].numel())
    last_image = int((base["ids"] == IMAGE_TOKEN).nonzero().max())
    g = torch.Generator().manual_seed(123)
    times = {"first": [], "other_question": [], "same_prompt": [], "encoder_only": [], "first_no_prefix": []}
    for _ in range(trials):
        pixels = torch.randn(base["pixels"].shape, generator=g)
        first = {**base, "pixels": pixels, "answer": 1}
        ids = first["ids"].clone()
        ids[last_image + 1:] = torch.randint(3, 49000, (ids.numel() - last_image - 1,), generator=g)
        other = {**first, "ids": ids}
        for prefix, plan in ((True, (("first", first), ("other_question", other), ("same_prompt", other))),
                             (False, (("first_no_prefix", first), ("encoder_only", other)))):
            engine = _engine(model, spec, requests, prefix_cache=prefix)
            for name, request in plan:
                engine.generate([_as_request(request)])
                times[name].append(engine.metrics.ttft[-1])
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- static batching

def _batches(requests):
    for start in range(0, len(requests), STATIC_BATCH):
        yield requests[start:start + STATIC_BATCH]


def _padded(batch, pad: int = 2):
    """Left-padded ids (B, L), mask (B, L), pixel_values (B, 1, 3, S, S) (zeros: no image) or None."""
    L = max(r["ids"].numel() for r in batch)
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, L - r["ids"].numel():] = r["ids"]
        mask[b, L - r["ids"].numel():] = 1
    pixels = None
    if any(r["pixels"] is not None for r in batch):
        shape = next(r["pixels"] for r in batch if r["pixels"] is not None).shape[1:]
        pixels = torch.zeros(len(batch), *shape)
        for b, r in enumerate(batch):
            if r["pixels"] is not None:
                pixels[b] = r["pixels"][0]
    return ids, mask, pixels


class _FirstToken:
    """A streamer (transformers' put/end protocol and vlmfast's): the time of the first new token."""

    def __init__(self, skip_prompt: bool):
        self.calls, self.skip, self.at = 0, skip_prompt, None

    def put(self, value):
        self.calls += 1
        if self.at is None and self.calls > (1 if self.skip else 0):
            self.at = time.perf_counter()

    def end(self):
        pass


def static(name, generate, requests, *, skip_prompt: bool) -> dict:
    """generate(ids, mask, pixels, max_new, streamer) per batch of 32, in arrival order."""
    ttfts = []

    def run():
        start = time.perf_counter()
        for batch in _batches(requests):
            ids, mask, pixels = _padded(batch)
            streamer = _FirstToken(skip_prompt)
            generate(ids, mask, pixels, max(r["answer"] for r in batch), streamer)
            ttfts.extend([streamer.at - start] * len(batch))  # every request arrived at the start
        return time.perf_counter() - start

    warm = requests[:2]
    ids, mask, pixels = _padded(warm)
    generate(ids, mask, pixels, 2, _FirstToken(skip_prompt))
    wall, peak = _peak_run(run)
    return _summary(name, sum(r["answer"] for r in requests), len(requests), wall, ttfts, peak)


def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    spec = QUICK if quick else FULL
    hf, ours = build_pair(spec, device, dtype)
    requests = workload(12 if quick else 48, spec, quick=quick)
    name = str(dtype).removeprefix("torch.")

    def hf_generate(ids, mask, pixels, max_new, streamer):
        with torch.inference_mode():
            kwargs = {} if pixels is None else {"pixel_values": pixels.to(device, dtype)}
            hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                        min_new_tokens=max_new, do_sample=False, pad_token_id=2, streamer=streamer, **kwargs)

    def ours_generate(ids, mask, pixels, max_new, streamer):
        ours.generate(ids.to(device), None if pixels is None else pixels.to(device, dtype), None, mask.to(device),
                      max_new_tokens=max_new, eos_token_id=[], streamer=streamer)

    runs = {"hf_static": static("transformers static b=32", hf_generate, requests, skip_prompt=True)}
    del hf
    gc.collect()
    runs["static"] = static("vlmfast static b=32", ours_generate, requests, skip_prompt=False)
    for clients in (32, 8):
        runs[f"c{clients}"] = continuous(ours, spec, requests, clients)
    runs["c1"] = continuous(ours, spec, requests, 1)
    repeated = repeated_image_prefill(ours, spec, requests)

    extra = {key: value for key, value in runs.items()}
    c32, c8, c1 = runs["c32"], runs["c8"], runs["c1"]
    label = f"{len(requests)} mixed requests {name}"
    results = [
        Result("serve", f"continuous c=32 vs static b=32 (vlmfast generate), {label}", "vlmfast continuous",
               c32["ms_per_token"], "vlmfast static b=32", runs["static"]["ms_per_token"], peak_mib=c32["peak_mib"],
               extra={"target": ">= 2x", **extra}),
        Result("serve", f"continuous c=32 vs static b=32 (transformers generate), {label}", "vlmfast continuous",
               c32["ms_per_token"], "transformers static b=32", runs["hf_static"]["ms_per_token"],
               peak_mib=c32["peak_mib"], extra={"target": ">= 2x"}),
        Result("serve", f"continuous c=32 vs one at a time (c=1), {label}",
               "vlmfast continuous", c32["ms_per_token"], "vlmfast c=1", c1["ms_per_token"],
               extra={"target": ">= 5x"}),
        Result("serve", f"continuous c=8 vs static b=32 (vlmfast generate), {label}", "vlmfast continuous",
               c8["ms_per_token"], "vlmfast static b=32", runs["static"]["ms_per_token"], peak_mib=c8["peak_mib"]),
        Result("serve", f"TTFT p99 c=32 steady state vs alone (c=1 p99), {label}", "vlmfast continuous",
               c32["ttft_steady_p99_ms"], "alone (c=1)", c1["ttft_p99_ms"],
               extra={"target": "ms <= 3x peer_ms (speedup >= 0.33)", "ttft_p99_all_ms": c32["ttft_p99_ms"]}),
        Result("serve", f"repeated image, another question: prefill vs first (prefix cache), {name}",
               "vlmfast cached image", 1e3 * repeated["other_question"], "first time", 1e3 * repeated["first"],
               extra={"target": ">= 10x", **{f"{k}_ms": 1e3 * v for k, v in repeated.items()}}),
        Result("serve", f"repeated image, another question: prefill vs first (encoder cache only), {name}",
               "vlmfast cached features", 1e3 * repeated["encoder_only"], "first time",
               1e3 * repeated["first_no_prefix"]),
    ]
    return results
