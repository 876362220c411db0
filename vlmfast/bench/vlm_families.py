"""LLaVA-1.5 and BLIP-2 (OPT) against transformers on the same random weights and inputs: prefill,
decode, generate, and a training step of each family's recipe (tokens/s and peak memory).

Models (random weights; a transformers model saved once and loaded by both sides), CPU-sized:
  llava: a CLIP ViT-B/16 tower at 224 x 224 (196 image tokens from layer -2) + a two-layer
         projector + a Llama decoder of SmolLM2's widths (576 wide, 16 layers, GQA 9/3, LLaVA's
         32064-token vocabulary, untied head);
  blip2: a ViT-B/16 at 224 + the Q-Former of BLIP-2 (768 wide, 12 layers, 32 queries,
         cross-attention every 2nd layer) + OPT-125m.
(quick: 2-layer toys of the same structure, measured in this process, one training case each:
the numbers only show that every path runs.)

Each side runs in its own fresh process (peak memory is that process's alone):
  inference: load, then prefill of b=1 (one image + 30 text tokens), generate of 1 and of 17
      tokens at b=1 and b=8 (rows left-padded, one image each); decode ms per token = the median
      over interleaved pairs of (generate 17 - generate 1) / 16 (timing.paired_step_ms); the
      "generate" case is prefill + 16 tokens at b=1 (the median of those pairs' runs); peak
      resident set of the whole process (loading included).
  training: batch of 2 rows (one image + 64 text tokens, labels on the last 30), float32 weights
      and AdamW (torch's fused) on both sides, the family's recipe on both: llava "stage 1" (the
      projector alone), llava "decoder" (projector + decoder + embeddings, the tower frozen: the
      full-parameter variant of stage 2, which transformers can run without peft), blip2
      "qformer" (queries, Q-Former, projection); vlmfast plain, and with gradient checkpointing
      + AdamW in the backward, against transformers plain. Peak = the highest resident set of a
      steady-state step minus the set right after loading (vlmfast/bench/finetune.py's method).
      The step's time is measured apart, in one more process that loads both sides and samples
      their steps in turn (timing.interleaved_ms): a shared machine's slow spells then fall on
      both alike (timed in separate processes minutes apart, one build read 0.84x and 1.76x).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vlmfast.bench.decode_case import decoder_weight_bytes
from vlmfast.bench.timing import Result, interleaved_ms, paired_step_ms

SPECS = {
    "llava": {
        "full": dict(
            vision_config=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16,
                               projection_dim=512),
            text_config=dict(model_type="llama", vocab_size=32064, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=16, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                             max_position_embeddings=2048, pad_token_id=32001,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
        "quick": dict(
            vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=32),
            text_config=dict(model_type="llama", vocab_size=32064, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=32001),
            image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
    },
    "blip2": {
        "full": dict(
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16),
            qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                cross_attention_frequency=2),
            text_config=dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                             eos_token_id=2, word_embed_proj_dim=768),
            num_query_tokens=32, image_token_index=50265),
        "quick": dict(
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
            text_config=dict(model_type="opt", vocab_size=50272, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, pad_token_id=1, bos_token_id=2, eos_token_id=2),
            num_query_tokens=8, image_token_index=50265),
    },
}
# family -> training recipes: what learns (both sides)
RECIPES = {"llava": ("stage 1", "decoder"), "blip2": ("qformer",)}
IN_BACKWARD = "checkpointing+adamw_in_backward"
PROMPT_TEXT, TRAIN_TEXT, TRAIN_LABELS, TRAIN_BATCH = 30, 64, 30, 2
NEW_TOKENS = 17


# ----------------------------------------------------------------------------- models, inputs

def save_checkpoint(family: str, size: str, folder: str) -> None:
    """transformers' model of the spec with seed-0 random weights, saved in folder."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if family == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**SPECS[family][size]))
    else:
        model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**SPECS[family][size]))
    model.save_pretrained(folder)


def _image_tokens(family: str, spec: dict) -> int:
    if family == "blip2":
        return spec["num_query_tokens"]
    vision = spec["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def make_inputs(family: str, size: str, batch: int, text: int, seed: int = 0) -> dict:
    """batch rows of one image + `text` text tokens; row b left-padded by b % 4 tokens (LLaVA:
    the image tokens after 5 text tokens; BLIP-2: first, as its processor puts them)."""
    spec = SPECS[family][size]
    g = torch.Generator().manual_seed(seed)
    n_image, token = _image_tokens(family, spec), spec["image_token_index"]
    pad = spec["text_config"]["pad_token_id"]
    L = n_image + text
    ids = torch.randint(3, 30000, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(batch):
        start = 0 if family == "llava" else n_image
        mask[b, start: start + b % 4] = 0
    ids[mask == 0] = pad
    image_start = 5 if family == "llava" else 0
    ids[:, image_start: image_start + n_image] = token
    side = spec["vision_config"]["image_size"]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch, 3, side, side, generator=g)}


def make_train_batch(family: str, size: str) -> dict:
    inputs = make_inputs(family, size, TRAIN_BATCH, TRAIN_TEXT if size == "full" else 12, seed=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])  # no padding in training batches
    labels = torch.full_like(inputs["input_ids"], -100)
    n = TRAIN_LABELS if size == "full" else 5
    labels[:, -n:] = inputs["input_ids"][:, -n:]
    return {**inputs, "labels": labels}


def load(side: str, family: str, folder: str, dtype: torch.dtype):
    if side == "vlmfast":
        from vlmfast.models import from_pretrained

        return from_pretrained(folder, dtype=dtype)
    import transformers

    transformers.logging.set_verbosity_error()
    cls = transformers.LlavaForConditionalGeneration if family == "llava" else transformers.Blip2ForConditionalGeneration
    return cls.from_pretrained(folder, dtype=dtype).eval()


# ----------------------------------------------------------------------------- one side, inference

def _prefill_call(side: str, model, inputs: dict):
    """One side's prefill of `inputs` (one row), into a cache on vlmfast's side."""
    if side == "vlmfast":
        cache = model.new_cache(1, inputs["input_ids"].shape[1])

        def prefill():
            with torch.inference_mode():
                cache.reset()
                model.prefill(inputs["input_ids"], inputs["pixel_values"], None, inputs["attention_mask"].bool(),
                              cache)
        return prefill

    def peer_prefill():
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    return peer_prefill


def _generate_call(side: str, model, inputs: dict):
    """One side's greedy generate(n) of exactly n tokens after `inputs`."""
    if side == "vlmfast":
        return lambda n: model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                        max_new_tokens=n, eos_token_id=[])

    def peer_generate(n):
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return peer_generate


def _one_row(family: str, size: str, dtype: torch.dtype) -> dict:
    one = make_inputs(family, size, 1, PROMPT_TEXT)
    one["pixel_values"] = one["pixel_values"].to(dtype)
    return one


def infer(side: str, family: str, folder: str, dtype_name: str, size: str, repeats: int) -> dict:
    """Generate of 1 / NEW_TOKENS tokens at b=1 and b=8 (the decode step from their difference);
    peak resident set at the end (loading and all of these)."""
    from vlmfast.bench import rss

    dtype = getattr(torch, dtype_name)
    new_tokens, batches = (NEW_TOKENS, (1, 8)) if size == "full" else (4, (1, 2))
    baseline = rss.status_mib("VmHWM")
    model = load(side, family, folder, dtype)
    out = {"baseline_mib": baseline}
    one = _one_row(family, size, dtype)
    for batch in batches:
        inputs = one if batch == 1 else make_inputs(family, size, batch, PROMPT_TEXT, seed=batch)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        generate = _generate_call(side, model, inputs)
        full, step = paired_step_ms(generate, new_tokens, repeats)
        out[f"b{batch}"] = {"generate_ms": full, "decode_ms": step,
                            "tokens": generate(new_tokens)[:, -new_tokens:].tolist()}
    out["new_tokens"] = new_tokens
    if side == "transformers":  # the same weights on both sides: one count serves both rows
        out["decoder_weight_bytes"] = decoder_weight_bytes(model)
    out["peak_mib"] = rss.status_mib("VmHWM")
    return out


def infer_timing(family: str, folder: str, dtype_name: str, size: str, repeats: int) -> dict:
    """Prefill and generate (b=1, NEW_TOKENS tokens) of both sides, loaded in this process and
    sampled in turn (timing.interleaved_ms)."""
    dtype = getattr(torch, dtype_name)
    new_tokens = NEW_TOKENS if size == "full" else 4
    one = _one_row(family, size, dtype)
    ours, peer = (load(side, family, folder, dtype) for side in ("vlmfast", "transformers"))
    cpu = torch.device("cpu")
    prefill_ms, peer_prefill_ms = interleaved_ms(_prefill_call("vlmfast", ours, one),
                                                 _prefill_call("transformers", peer, one), cpu,
                                                 warmup=1, repeats=repeats)
    ours_generate, peer_generate = _generate_call("vlmfast", ours, one), _generate_call("transformers", peer, one)
    generate_ms, peer_generate_ms = interleaved_ms(lambda: ours_generate(new_tokens),
                                                   lambda: peer_generate(new_tokens), cpu, warmup=1, repeats=repeats)
    return {"prefill_ms": prefill_ms, "peer_prefill_ms": peer_prefill_ms, "generate_ms": generate_ms,
            "peer_generate_ms": peer_generate_ms}


# ----------------------------------------------------------------------------- one side, training

def _set_trainable(side: str, family: str, model, recipe: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if side == "vlmfast":
        parts = model.parts()
        chosen = ["connector"] + (["decoder", "embeddings"] if recipe == "decoder" else [])
        for name in chosen:
            for p in parts[name]:
                p.requires_grad_(True)
        return
    if family == "llava":
        modules = [model.model.multi_modal_projector]
        if recipe == "decoder":
            modules += [model.model.language_model, model.lm_head]
    else:
        modules = [model.qformer, model.language_projection]
        model.query_tokens.requires_grad_(True)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


class _TrainingStep(NamedTuple):
    run: Callable[[], float]  # one step; returns the loss
    tokens: int
    trainable: int


def _training_step(side: str, family: str, folder: str, recipe: str, setting: str, size: str,
                   libc) -> _TrainingStep:
    """One side's model set up for the recipe and setting (float32), and its step."""
    from vlmfast.bench import finetune as fb
    from vlmfast.train.adamw_in_backward import AdamWInBackward

    model = load(side, family, folder, torch.float32)
    _set_trainable(side, family, model, recipe)
    # transformers in eval mode: its train mode adds BLIP-2's dropout (Q-Former, OPT), which vlmfast
    # does not compute; the gradients are the same computation on both sides then
    model.train() if side == "vlmfast" else model.eval()
    if side == "vlmfast" and "checkpointing" in setting:
        model.set_gradient_checkpointing(True)
    fb._return_freed_memory(libc)
    params = [p for p in model.parameters() if p.requires_grad]
    options = dict(lr=1e-5, fused=True)
    optimizer = AdamWInBackward(params, **options) if "adamw_in_backward" in setting else \
        torch.optim.AdamW(params, **options)
    batch = make_train_batch(family, size)

    def step():
        if side == "vlmfast":
            loss = model.loss(batch["input_ids"], batch["labels"], batch["pixel_values"], batch["attention_mask"])
        else:
            loss = model(**batch).loss
        loss.backward()
        if not isinstance(optimizer, AdamWInBackward):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _TrainingStep(step, int(batch["attention_mask"].sum()), sum(p.numel() for p in params))


def train(side: str, family: str, folder: str, recipe: str, setting: str, size: str) -> dict:
    """Peak memory of a steady-state step above the loaded weights, and the loss, in a process of
    its own (the step's time comes from train_timing)."""
    from vlmfast.bench import finetune as fb
    from vlmfast.bench import rss

    libc = fb._glibc() if size == "full" else None
    fb._return_freed_memory(libc, 64 * 1024)
    step = _training_step(side, family, folder, recipe, setting, size, libc)
    loaded = rss.status_mib("VmRSS")
    loss = step.run()  # the AdamW state exists from here on
    fb._return_freed_memory(libc)
    try:
        rss.reset_peak()
        step.run()
        peak = rss.status_mib("VmHWM") - loaded
    except OSError:  # no /proc/self/clear_refs here
        peak = None
    return {"peak_mib": peak, "loss": loss, "tokens": step.tokens, "trainable": step.trainable}


def train_timing(family: str, folder: str, recipe: str, setting: str, size: str, repeats: int) -> dict:
    """Median step ms of vlmfast (in `setting`) and of transformers (plain), both sides loaded in
    this process and their steps sampled in turn (timing.interleaved_ms)."""
    from vlmfast.bench import finetune as fb

    libc = fb._glibc() if size == "full" else None
    ours = _training_step("vlmfast", family, folder, recipe, setting, size, libc)
    peer = _training_step("transformers", family, folder, recipe, "plain", size, libc)
    ours.run(), peer.run()  # the AdamW states exist from here on
    if libc is not None:
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD (no dynamic threshold): the same for both
    ms, peer_ms = interleaved_ms(ours.run, peer.run, torch.device("cpu"), warmup=1, repeats=repeats)
    return {"ms": ms, "peer_ms": peer_ms}


def _call(in_process: bool, function: str, *args):
    """function(*args) here (quick: the numbers only show the path works) or in a fresh process."""
    return globals()[function](*args) if in_process else _child(function, *args)


def _child(function: str, *args):
    code = (f"import json; from vlmfast.bench.vlm_families import {function}; "
            f"print(json.dumps({function}(*{list(args)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"vlm_families bench: {function}{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- suite

def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    if torch.device(device).type != "cpu":
        raise ValueError("device: the vlm_families suite measures the CPU (each side in a fresh process)")
    size = "quick" if quick else "full"
    repeats = 1 if quick else 3
    train_repeats = 2 if quick else 4  # samples of each side, taken in turn (infer_timing, train_timing)
    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    for family in ("llava", "blip2"):
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(family, size, folder)
            ours, peer = (_call(quick, "infer", side, family, folder, dtype_name, size, repeats)
                          for side in ("vlmfast", "transformers"))
            timed = _call(quick, "infer_timing", family, folder, dtype_name, size, train_repeats)
            results += _inference_results(family, dtype_name, ours, peer, timed)
            if dtype != torch.float32:
                continue  # training is measured in float32 (weights and AdamW), as the finetune suite's plain cases
            for recipe in RECIPES[family][:1] if quick else RECIPES[family]:
                peer = _call(quick, "train", "transformers", family, folder, recipe, "plain", size)
                for setting in ("plain",) if quick else ("plain", IN_BACKWARD):
                    ours = _call(quick, "train", "vlmfast", family, folder, recipe, setting, size)
                    timed = _call(quick, "train_timing", family, folder, recipe, setting, size, train_repeats)
                    results.append(Result(
                        "vlm_families", f"{family} train step b={TRAIN_BATCH} {recipe} vlmfast {setting} vs plain",
                        "vlmfast", timed["ms"], "transformers", timed["peer_ms"], peak_mib=ours["peak_mib"],
                        extra={"tokens_per_s": ours["tokens"] * 1e3 / timed["ms"],
                               "peer_tokens_per_s": peer["tokens"] * 1e3 / timed["peer_ms"],
                               "peer_peak_mib": peer["peak_mib"], "memory_ratio": _ratio(ours, peer),
                               "loss": ours["loss"], "peer_loss": peer["loss"], "trainable": ours["trainable"]}))
    return results


def _ratio(ours: dict, peer: dict) -> float | None:
    return ours["peak_mib"] / peer["peak_mib"] if ours["peak_mib"] and peer["peak_mib"] else None


def _inference_results(family: str, dtype_name: str, ours: dict, peer: dict, timed: dict) -> list[Result]:
    suite = "vlm_families"
    out = [Result(suite, f"{family} prefill b=1 1 image + {PROMPT_TEXT} text {dtype_name}", "vlmfast",
                  timed["prefill_ms"], "transformers", timed["peer_prefill_ms"])]
    b1, p1 = ours["b1"], peer["b1"]
    out.append(Result(suite, f"{family} generate b=1 prefill + {ours['new_tokens'] - 1} tokens {dtype_name}", "vlmfast",
                      timed["generate_ms"], "transformers", timed["peer_generate_ms"], peak_mib=ours["peak_mib"],
                      extra={"peer_peak_mib": peer["peak_mib"], "memory_ratio": _ratio(ours, peer),
                             "baseline_mib": ours["baseline_mib"], "peer_baseline_mib": peer["baseline_mib"],
                             "greedy_equal": b1["tokens"] == p1["tokens"] if dtype_name == "float32" else None}))
    for batch in sorted(int(key[1:]) for key in ours if key.startswith("b") and key[1:].isdigit()):
        o, p = ours[f"b{batch}"], peer[f"b{batch}"]
        out.append(Result(suite, f"{family} decode b={batch} {dtype_name}", "vlmfast", o["decode_ms"],
                          "transformers", p["decode_ms"], gbps=peer["decoder_weight_bytes"] / o["decode_ms"] / 1e6,
                          extra={"tokens_per_s": batch * 1e3 / o["decode_ms"],
                                 "peer_tokens_per_s": batch * 1e3 / p["decode_ms"],
                                 "greedy_equal": o["tokens"] == p["tokens"] if dtype_name == "float32" else None}))
    return out


if __name__ == "__main__":  # python -m vlmfast.bench.vlm_families [--quick]: the table alone
    for r in run(torch.device("cpu"), torch.float32, quick="--quick" in sys.argv):
        print(f"{r.case:70s} {r.ms:10.1f} ms  {r.peer_ms:10.1f} ms  {r.speedup:5.2f}x  "
              f"{r.extra.get('memory_ratio') or ''}")
