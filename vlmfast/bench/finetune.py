"""SmolVLM fine-tuning step: forward + backward + AdamW step of vlmfast's SmolVLM against
transformers' SmolVLMForConditionalGeneration with labels (its default attention, sdpa; eager
autograd), the same random weights (vlmfast/bench/smolvlm.py's build_pair) and the same batch.

Batch (TARGETS.md / issue 10): `batch` rows of one 512 x 512 image (64 image tokens) + 100 text
tokens, labels on the last 30 tokens (-100 elsewhere), no padding; SmolVLM2-256M's dimensions
(quick: a 2-layer toy of the same structure, 4 image + 12 text tokens). float32 weights and
AdamW state on both sides, torch's fused AdamW for both (on the CPU the default for-each AdamW
takes ~4x longer, a cost both sides would share); the run's dtype bfloat16 means
torch.autocast(bfloat16) around the forward on both sides (the Trainer's bf16 option), float32
means no autocast.

Settings: "plain" (every activation kept), "checkpointing" (each vision encoder layer and
decoder layer recomputed in the backward: vlmfast set_gradient_checkpointing, transformers
activation_checkpointing_enable, non-reentrant) and, vlmfast only, "checkpointing+adamw_in_backward"
(vlmfast.train.adamw_in_backward: each parameter updated and its gradient dropped as soon as the
gradient is complete, the same AdamW update; the trick is plain PyTorch and would save the
same ~1 GiB of gradients for transformers). Cases: vlmfast plain vs transformers plain, vlmfast
checkpointing vs transformers plain (the memory option against the peer's default), vlmfast
checkpointing vs transformers checkpointing (like for like), vlmfast checkpointing +
AdamW-in-backward vs transformers plain.

Each Result: ms per step, extra tokens/s of both (all B * L tokens through the decoder) and the
loss of both (same model, same batch: equal up to rounding), peak_mib = vlmfast's step peak,
extra peer_peak_mib. Peak memory of a step = the highest memory during a steady-state step (the
AdamW state exists) minus the memory right after loading the model: gradients + AdamW state +
activations + temporaries, what training needs beyond the weights. extra *_activation_mib =
the same peak minus the memory just before that step (gradients + activations + temporaries:
where the implementations differ). CPU: each side in its own fresh subprocess, peak RSS (VmHWM,
reset through /proc/self/clear_refs) with glibc told to return freed memory (mmap threshold
64 KiB, malloc_trim) so that memory freed by an earlier step cannot hide growth; CUDA:
torch.cuda.max_memory_allocated. quick: in this process (the numbers only show the path works).
The CPU subprocesses run one after the other: on a busy machine their times are not comparable
(measure on a quiet one; benchmarks/test_finetune_bench.py's rounds are closer in time).
"""

import copy
import ctypes
import functools
import gc
import json
import subprocess
import sys

import torch

from vlmfast.bench import rss, smolvlm
from vlmfast.bench.timing import Result, time_ms
from vlmfast.train.adamw_in_backward import AdamWInBackward

MIB = 2**20
BATCH = {"cpu": 2, "cuda": 8}
TEXT_TOKENS, LABEL_TOKENS = 100, 30
QUICK_TEXT_TOKENS, QUICK_LABEL_TOKENS = 12, 5
SIDES = ("vlmfast", "transformers")
SETTINGS = ("plain", "checkpointing")
IN_BACKWARD = "checkpointing+adamw_in_backward"
# (vlmfast setting, transformers setting) of each case
CASES = [("plain", "plain"), ("checkpointing", "plain"), ("checkpointing", "checkpointing"), (IN_BACKWARD, "plain")]


def make_batch(spec: dict, batch: int, text_tokens: int, label_tokens: int, seed: int = 0):
    """input_ids (B, L) = 8 text tokens, the image tokens, the rest text; attention_mask (B, L)
    all ones; labels (B, L): -100 except the last label_tokens; pixel_values (B, 1, 3, S, S)."""
    vision = spec["vision_config"]
    size = vision["image_size"]
    image_tokens = (size // vision["patch_size"] // spec["scale_factor"]) ** 2
    g = torch.Generator().manual_seed(seed)
    L = text_tokens + image_tokens
    ids = torch.randint(3, smolvlm.IMAGE_TOKEN - 100, (batch, L), generator=g)
    ids[:, 8 : 8 + image_tokens] = smolvlm.IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[:, -label_tokens:] = ids[:, -label_tokens:]
    pixels = torch.randn(batch, 1, 3, size, size, generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels)


def build_side(side: str, spec: dict, setting: str, device, pair=None) -> torch.nn.Module:
    """One side's float32 model in train mode on device, the other side's copy freed. pair: a
    (transformers, vlmfast) smolvlm.build_pair to copy from (left untouched) instead of building."""
    if pair is not None:
        model = copy.deepcopy(pair[1] if side == "vlmfast" else pair[0])
    else:
        hf, ours = smolvlm.build_pair(spec, "cpu", torch.float32)
        model = ours if side == "vlmfast" else hf
        del hf, ours
        gc.collect()
    model.to(device).train()
    if "checkpointing" in setting.split("+"):
        if side == "vlmfast":
            model.set_gradient_checkpointing(True)
        else:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def loss_of(side: str, model, batch: dict) -> torch.Tensor:
    if side == "vlmfast":
        return model.loss(batch["input_ids"], batch["labels"], batch["pixel_values"], None, batch["attention_mask"])
    return model(**batch, use_cache=False).loss


def make_optimizer(model, setting: str):
    """torch's fused AdamW, or AdamWInBackward (the same update, made during the backward)."""
    options = dict(lr=1e-5, fused=True)
    if "adamw_in_backward" in setting.split("+"):
        return AdamWInBackward(model.parameters(), **options)
    return torch.optim.AdamW(model.parameters(), **options)


def train_step(side: str, model, optimizer, batch: dict, dtype: torch.dtype) -> float:
    """One forward + backward + AdamW step; gradients set to None after. Returns the loss."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(side, model, batch)
    loss.backward()  # AdamWInBackward steps here
    if not isinstance(optimizer, AdamWInBackward):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- CPU memory

def _rss_mib() -> float:
    return rss.status_mib("VmRSS")


def _return_freed_memory(libc, mmap_threshold: int | None = None) -> None:
    """glibc keeps freed heap memory (and raises its mmap threshold up to 32 MiB as big blocks
    are freed), so an earlier step's freed memory could be reused unseen by the RSS. With a
    fixed small threshold every block over it is its own mapping, returned when freed."""
    if libc is None:
        return
    if mmap_threshold is not None:
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (also stops the dynamic threshold)
    libc.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - musl and others lack it
        return libc
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- one side

def measure(side: str, spec_name: str, setting: str, dtype_name: str, device: str = "cpu",
            batch_size: int | None = None, repeats: int = 3, pair=None) -> dict:
    """Builds one side (or copies it from `pair`, see build_side), runs a warm-up step, a
    memory-measured step, then `repeats` timed steps.
    Returns {"ms", "peak_mib", "activation_mib", "loss", "tokens", "attention"} (peaks None
    where they cannot be measured)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype_name)
    spec = smolvlm.QUICK if spec_name == "quick" else smolvlm.FULL
    quick = spec_name == "quick"
    text, labels = (QUICK_TEXT_TOKENS, QUICK_LABEL_TOKENS) if quick else (TEXT_TOKENS, LABEL_TOKENS)
    batch_size = batch_size or BATCH["cuda" if device.type == "cuda" else "cpu"]
    batch = {k: v.to(device) for k, v in make_batch(spec, batch_size, text, labels).items()}
    on_cpu = device.type == "cpu"
    libc = _glibc() if on_cpu and not quick else None  # quick runs in the caller's process: leave its malloc alone
    # The small mmap threshold is set before the models are built: built under glibc's default
    # (its threshold climbing to 32 MiB) the two models' weights, and the peer copy deleted,
    # would leave holes in the heap that every later small allocation re-touches, a step's RSS
    # then climbing with heap fragmentation rather than with what either side holds.
    _return_freed_memory(libc, 64 * 1024)
    model = build_side(side, spec, setting, device, pair)
    if on_cpu:
        _return_freed_memory(libc)
    loaded = _rss_mib() if on_cpu else torch.cuda.memory_allocated(device) / MIB
    optimizer = make_optimizer(model, setting)
    loss = train_step(side, model, optimizer, batch, dtype)  # AdamW state exists from here on

    peak = activation = None
    if on_cpu:
        _return_freed_memory(libc)
        before = _rss_mib()
        try:
            rss.reset_peak()
            train_step(side, model, optimizer, batch, dtype)
            high = rss.status_mib("VmHWM")
            peak, activation = high - loaded, high - before
        except OSError:  # no /proc/self/clear_refs (not Linux, or not permitted)
            train_step(side, model, optimizer, batch, dtype)
        if libc is not None:
            libc.mallopt(-3, 32 * MIB)  # timing with the usual glibc behaviour again (its maximum threshold)
    else:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
        train_step(side, model, optimizer, batch, dtype)
        torch.cuda.synchronize(device)
        high = torch.cuda.max_memory_allocated(device) / MIB
        peak, activation = high - loaded, high - before

    ms = time_ms(functools.partial(train_step, side, model, optimizer, batch, dtype), device, warmup=0, repeats=repeats)
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) if side != "vlmfast" else None
    out = dict(ms=ms, peak_mib=peak, activation_mib=activation, loss=loss,
               tokens=int(batch["input_ids"].numel()), attention=attention)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_in_subprocess(side: str, spec_name: str, setting: str, dtype_name: str, repeats: int) -> dict:
    """measure() in a fresh Python: its peak RSS is this side's alone."""
    call = f"measure({side!r}, {spec_name!r}, {setting!r}, {dtype_name!r}, repeats={repeats})"
    code = f"import json; from vlmfast.bench.finetune import measure; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"finetune bench: {side} {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- suite

def run(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Result]:
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    spec_name = "quick" if quick else "full"
    repeats = 1 if quick else 3
    in_process = quick or device.type == "cuda"
    measured = {}
    # in this process: one pair built (a full-size build takes a while), each side a copy of it
    pair = smolvlm.build_pair(smolvlm.QUICK if quick else smolvlm.FULL, "cpu", torch.float32) if in_process else None
    for side, setting in sorted({(s, c[i]) for c in CASES for i, s in enumerate(SIDES)}):
        if in_process:
            measured[side, setting] = measure(side, spec_name, setting, dtype_name, str(device), repeats=repeats,
                                              pair=pair)
        else:
            measured[side, setting] = measure_in_subprocess(side, spec_name, setting, dtype_name, repeats)
    results = []
    for ours_setting, peer_setting in CASES:
        ours, peer = measured["vlmfast", ours_setting], measured["transformers", peer_setting]
        batch = BATCH["cuda" if device.type == "cuda" else "cpu"]
        name = f"train step b={batch} L={ours['tokens'] // batch} {dtype_name}"
        if dtype != torch.float32:
            name += " autocast"
        name += f" vlmfast {ours_setting} vs {peer_setting}"
        memory_ratio = ours["peak_mib"] / peer["peak_mib"] if ours["peak_mib"] and peer["peak_mib"] else None
        results.append(Result(
            "finetune", name, "vlmfast", ours["ms"], "transformers", peer["ms"], peak_mib=ours["peak_mib"],
            extra={"tokens_per_s": ours["tokens"] * 1e3 / ours["ms"],
                   "peer_tokens_per_s": peer["tokens"] * 1e3 / peer["ms"],
                   "peer_peak_mib": peer["peak_mib"], "activation_mib": ours["activation_mib"],
                   "peer_activation_mib": peer["activation_mib"], "memory_ratio": memory_ratio,
                   "loss": ours["loss"], "peer_loss": peer["loss"], "peer_attention": peer["attention"],
                   "setting": ours_setting, "peer_setting": peer_setting},
        ))
    return results
