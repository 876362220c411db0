"""Hugging Face checkpoints: reading and writing safetensors (single file or sharded index), the
key mapping between Hugging Face names and ours (in this one place), and strict loading.

Our modules use Hugging Face's names except one thing: q_proj/k_proj/v_proj of every attention
layer are one fused `qkv` Linear (one GEMM instead of three). Loading concatenates them, saving
splits them back (rows [H*E | Hkv*E | Hkv*E]: with grouped-query attention the three parts
differ). Pickle files (pytorch_model.bin) are never read.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlmfast import _atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_QKV = ("q_proj", "k_proj", "v_proj")
# Buffers older transformers releases saved; they carry nothing a model needs (positions 0..N-1).
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


# ----------------------------------------------------------------------------- key mapping

def hf_to_native(state: dict) -> dict:
    """Hugging Face keys -> ours: `...self_attn.{q,k,v}_proj.{weight,bias}` -> `...self_attn.qkv.*`.

    A layer with only some of q/k/v is left unfused, so strict loading reports the gap by name.
    """
    out, pending = {}, {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        parts = key.rsplit(".", 2)  # prefix, proj, weight|bias
        if len(parts) == 3 and parts[1] in _QKV and parts[0].endswith("self_attn"):
            pending.setdefault((parts[0], parts[2]), {})[parts[1]] = (key, value)
        else:
            out[key] = value
    for (prefix, kind), found in pending.items():
        if len(found) == 3:
            out[f"{prefix}.qkv.{kind}"] = torch.cat([found[p][1] for p in _QKV], dim=0)
        else:
            out.update({key: value for key, value in found.values()})
    return out


def qkv_split_sizes(state: dict, prefix: str, rows: int) -> tuple[int, int, int]:
    """Rows of q, k and v in the fused `{prefix}.qkv` tensor of `rows` rows: q has as many as the
    output projection (o_proj or out_proj) has inputs (H*E), k and v share the rest equally
    (Hkv*E each; fewer than q under grouped-query attention)."""
    for out_name in ("o_proj", "out_proj"):
        out_weight = state.get(f"{prefix}.{out_name}.weight")
        if out_weight is not None:
            q_rows = out_weight.shape[1]
            if q_rows < rows and (rows - q_rows) % 2 == 0:
                kv_rows = (rows - q_rows) // 2
                return q_rows, kv_rows, kv_rows
            raise ValueError(
                f"{prefix}.qkv: expected H*E + 2*Hkv*E rows with H*E = {q_rows} (the inputs of "
                f"{prefix}.{out_name}), got {rows}"
            )
    raise ValueError(f"{prefix}.qkv: no {prefix}.o_proj.weight or out_proj.weight to tell the q/k/v split sizes")


def native_to_hf(state: dict) -> dict:
    """Ours -> Hugging Face keys; every tensor contiguous and owning its memory (safetensors
    refuses shared storage). Fused q/k/v are split by qkv_split_sizes."""
    out = {}
    for key, value in state.items():
        parts = key.rsplit(".", 2)
        if len(parts) == 3 and parts[1] == "qkv":
            sizes = qkv_split_sizes(state, parts[0], value.shape[0])
            for name, chunk in zip(_QKV, value.split(sizes, dim=0)):
                out[f"{parts[0]}.{name}.{parts[2]}"] = chunk.detach().clone().contiguous()
        else:
            out[key] = value.detach().clone().contiguous()
    return out


# ----------------------------------------------------------------------------- reading

def read_config(path) -> dict:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"path: expected a checkpoint directory with {CONFIG_NAME}, none in {path}")
    return json.loads((path / CONFIG_NAME).read_text())


def weight_files(path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"path: shards named in {INDEX_NAME} are missing: {missing}")
        return [path / s for s in shards]
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(
        f"path: expected {WEIGHTS_NAME} or {INDEX_NAME} in {path} (safetensors only; pickle files are "
        f"never loaded), found {found}"
    )


def read_weights(path) -> dict:
    """Every tensor of a checkpoint, by Hugging Face key."""
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except SafetensorError as error:  # truncated or not safetensors: name the file, no traceback
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
    return state


def resolve_dtype(dtype, device=None) -> torch.dtype | None:
    """from_pretrained's dtype as a torch.dtype, or None (the model's own, float32): a floating
    torch.dtype, its name ("bfloat16"), or "auto" (bfloat16 where the device computes it natively,
    smolvlm.model.preferred_dtype). ValueError / TypeError naming dtype otherwise."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if dtype == "auto":
        from vlmfast.models.smolvlm.model import preferred_dtype

        return preferred_dtype(device)
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    if isinstance(dtype, (str, torch.dtype)):
        raise ValueError(f'dtype: expected a floating dtype (torch.bfloat16, "bfloat16"...), "auto" or None, '
                         f"got {dtype!r}")
    raise TypeError(f"dtype: expected a torch.dtype, its name, \"auto\" or None, got {type(dtype).__name__}")


def load_state(model: torch.nn.Module, hf_state: dict, *, device=None, dtype=None,
               float32_prefixes: tuple[str, ...] = ()) -> None:
    """Strictly loads Hugging Face-keyed tensors into `model` (which may live on the meta device:
    tensors are assigned, not copied). Floating tensors take dtype (None: the model's own), except
    keys under float32_prefixes, which keep the model's (a float16 BLIP-2's Q-Former). Raises ValueError
    listing every missing key, unexpected key and wrong shape at once."""
    dtype = resolve_dtype(dtype, device)
    state = hf_to_native(hf_state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing keys: {missing}")
        if unexpected:
            lines.append(f"unexpected keys: {unexpected}")
        if wrong:
            lines.append(f"wrong shapes: {wrong}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}:\n  " + "\n  ".join(lines))
    params = model.state_dict()
    for key, value in state.items():
        # floating tensors take the requested dtype (default: the module's, float32); others stay
        kept = dtype is None or key.startswith(float32_prefixes)
        target = (params[key].dtype if kept else dtype) if value.is_floating_point() else value.dtype
        state[key] = value.to(device=device or "cpu", dtype=target)
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------- writing

def _atomic_write(target: Path, write) -> None:
    """write(tmp_path) then rename: a reader never sees a half-written file; the file gets the
    umask's mode like every other file of the checkpoint (vlmfast._atomic)."""
    _atomic.atomic_write(target, write)


def save_checkpoint(path, config: dict, model: torch.nn.Module, *, max_shard_bytes: int | None = None) -> None:
    """Writes config.json and the model's weights in Hugging Face layout (see write_checkpoint)."""
    write_checkpoint(path, config, native_to_hf(model.state_dict()), max_shard_bytes=max_shard_bytes)


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def write_checkpoint(path, config: dict, hf_state: dict, *, max_shard_bytes: int | None = None) -> None:
    """Writes config.json (its "dtype" set to the weights') and Hugging Face-keyed tensors as
    model.safetensors, or as shards of at most max_shard_bytes with an index; each file
    atomically. Weight files of an earlier save that this one does not name are removed."""
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes: expected None or a positive int, got {max_shard_bytes!r}")
    if not hf_state:
        raise ValueError("hf_state: expected at least one tensor to write")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = hf_state
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {**config, "dtype": dtype}
    config.pop("torch_dtype", None)  # the older name of "dtype": one of the two only
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))

    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if max_shard_bytes is not None and current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)

    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata=meta))
        (path / INDEX_NAME).unlink(missing_ok=True)
        _remove_stale_shards(path, keep=set())
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=meta))
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write(path / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    (path / WEIGHTS_NAME).unlink(missing_ok=True)
    _remove_stale_shards(path, keep=set(weight_map.values()))


def _remove_stale_shards(path: Path, keep: set) -> None:
    # a reader globbing the folder (or a later index) must not pick up shards of an older save
    for file in path.iterdir():
        if _SHARD_NAME.fullmatch(file.name) and file.name not in keep:
            file.unlink()


# Processor, tokenizer and generation files of a checkpoint (everything but config and weights).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)


def copy_processor_files(source, target) -> list[str]:
    """Copies the PROCESSOR_FILES that exist in checkpoint directory `source` into `target`
    (atomically each). Returns the names copied."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise FileNotFoundError(f"processor_from: expected a checkpoint directory, got {source}")
    copied = []
    for name in PROCESSOR_FILES:
        src = source / name
        if not src.is_file():
            continue
        if not (target / name).exists() or not (target / name).samefile(src):
            _atomic_write(target / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        copied.append(name)
    return copied


def write_pretrained(path, config: dict, hf_state: dict, *, generation_defaults: dict, max_shard_bytes=None,
                     processor_from=None) -> None:
    """A vision-language model's save_pretrained: config.json + weights (write_checkpoint), the
    processor files of checkpoint directory processor_from (None: none), and generation_config.json
    from generation_defaults (the stop / pad ids the loaded checkpoint generated with, so a reload
    generates the same) when processor_from gave none."""
    if processor_from is not None and not Path(processor_from).is_dir():
        raise FileNotFoundError(f"processor_from: expected a checkpoint directory, got {processor_from}")
    write_checkpoint(path, config, hf_state, max_shard_bytes=max_shard_bytes)
    copied = copy_processor_files(processor_from, path) if processor_from is not None else []
    if "generation_config.json" not in copied and generation_defaults:
        text = json.dumps(generation_defaults, indent=2)
        _atomic_write(Path(path) / "generation_config.json", lambda tmp: Path(tmp).write_text(text))


def build_pretrained(cls, config, path, *, device=None, dtype=None):
    """Builds cls(config) on the meta device (no wasted random init) and loads path's weights,
    each tensor cast to dtype as it is read (a float32 checkpoint loaded into bf16 is never held
    whole)."""
    from vlmfast.models import weights_io  # (it reads the weight files this module lists)

    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = cls(config)
    state = weights_io.read_weights(path, dtype=dtype or torch.float32, device=device)
    load_state(model, state, device=device, dtype=dtype)
    return model.eval()
