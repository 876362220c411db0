"""A checkpoint's tensors read into process memory, one tensor at a time, without a memory map.

safetensors' safe_open maps the file: its tensors are views of the mapping, every page touched
stays resident (and counted in the process's memory) while any tensor of the file is alive, and
the tensors that loading fuses (q/k/v, gate/up: a copy is made) keep their source pages resident
too. Read with plain file reads instead, a fused source is freed as soon as it has been copied, so
a loaded model holds its weights once (for SmolVLM2-256M in bfloat16: ~0.5 GB, not ~0.75 GB).
Given a dtype, each tensor is cast as soon as it is read: loading a float32 checkpoint into
bfloat16 holds the float32 bytes of one tensor (or one fused group) at a time, never of the
whole model (for the LLaVA bench model: a peak of ~0.6 GB, not ~1.3 GB).

Format (safetensors): 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the data,
offsets relative to its start.
"""

import ctypes
import json
import struct

import torch
from safetensors import safe_open

from vlmfast.models import checkpoint

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Groups loading concatenates along dim 0 (checkpoint.hf_to_native, model.fuse_gate_up), by the
# module that owns them: parts in order -> the fused name.
_FUSED = {"self_attn": (("q_proj", "k_proj", "v_proj"), "qkv"), "mlp": (("gate_proj", "up_proj"), "gate_up")}


def _groups(header: dict) -> tuple[dict, set]:
    """{fused key: [part keys in order]} for every complete group of same-dtype parts with the
    same trailing shape, and the set of keys they cover."""
    found = {}
    for name in header:
        prefix, _, kind = name.rpartition(".")
        owner, _, proj = prefix.rpartition(".")
        for suffix, (parts, fused) in _FUSED.items():
            if owner.endswith(suffix) and proj in parts:
                found.setdefault(f"{owner}.{fused}.{kind}", {})[proj] = name
    groups = {}
    for fused_name, members in found.items():
        owner = fused_name.rsplit(".", 2)[0]
        parts = next(p for suffix, (p, _) in _FUSED.items() if owner.endswith(suffix))
        if len(members) != len(parts):
            continue  # incomplete: left unfused, so strict loading names what is missing
        keys = [members[p] for p in parts]
        entries = [header[k] for k in keys]
        if len({e["dtype"] for e in entries}) == 1 and len({tuple(e["shape"][1:]) for e in entries}) == 1 \
                and all(len(e["shape"]) >= 1 for e in entries):
            groups[fused_name] = keys
    return groups, {k for keys in groups.values() for k in keys}


def _read_into(f, start: int, entry: dict, out: torch.Tensor, name: str, file) -> None:
    begin, end = entry["data_offsets"]
    f.seek(start + begin)
    if f.readinto(memoryview(out.numpy())) != end - begin:
        raise ValueError(f"path: {file} is truncated (tensor {name!r})")


def _placer(dtype, device, float32_prefixes: tuple):
    """(name, tensor) -> the tensor as loading will hold it: floating ones in dtype (float32 under
    float32_prefixes, and where dtype is None: the dtype every vlmfast model is built in), on device."""
    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor if device is None else tensor.to(device)
        target = torch.float32 if dtype is None or name.startswith(float32_prefixes) else dtype
        return tensor.to(device=device, dtype=target)
    return place


def _read_file(file, fuse: bool, place) -> dict:
    state = {}
    with open(file, "rb") as f:
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        except (struct.error, ValueError) as error:  # too short, or no JSON header: not safetensors
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
        header.pop("__metadata__", None)
        start = 8 + header_len
        groups, grouped = _groups(header) if fuse else ({}, set())
        known = {n for n, e in header.items() if e["dtype"] in _DTYPES}
        for fused_name, keys in groups.items():
            if not all(k in known for k in keys):
                grouped -= set(keys)
                continue
            entries = [header[k] for k in keys]
            sizes = [e["data_offsets"][1] - e["data_offsets"][0] for e in entries]
            raw = torch.empty(sum(sizes), dtype=torch.uint8)
            offset = 0
            for key, entry, size in zip(keys, entries, sizes):  # each part straight into its rows
                _read_into(f, start, entry, raw[offset: offset + size], key, file)
                offset += size
            rows = sum(e["shape"][0] for e in entries)
            fused = raw.view(_DTYPES[entries[0]["dtype"]]).reshape(rows, *entries[0]["shape"][1:])
            state[fused_name] = place(fused_name, fused)
        for name, entry in header.items():
            if name in grouped or name not in known:
                continue
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            _read_into(f, start, entry, raw, name, file)
            state[name] = place(name, raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"]))
    exotic = [n for n in header if n not in known]
    if exotic:  # e.g. float8: let safetensors decode them
        with safe_open(str(file), framework="pt") as f:
            for name in exotic:
                state[name] = place(name, f.get_tensor(name).clone())
    return state


def read_weights(path, *, fuse: bool = False, dtype: torch.dtype | None = None, device=None,
                 float32_prefixes: tuple[str, ...] = ()) -> dict:
    """Every tensor of the checkpoint at `path` (as vlmfast.models.checkpoint.read_weights), each
    in its own memory; little-endian hosts (the format's byte order). fuse: complete
    `...self_attn.{q,k,v}_proj.*` and `...mlp.{gate,up}_proj.*` groups come back already
    concatenated along dim 0 as `...self_attn.qkv.*` and `...mlp.gate_up.*` (what loading would
    make of them), read straight into place (groups within one file; a group split between
    shards comes back in parts, for loading to concatenate). dtype / device: where either is
    given, each floating tensor is cast to dtype (None: float32; keys under float32_prefixes:
    float32) and moved to device as soon as it is read, checkpoint.load_state's rule applied one
    tensor at a time."""
    dtype = checkpoint.resolve_dtype(dtype, device)
    place = _placer(dtype, device, float32_prefixes) if dtype is not None or device is not None \
        else (lambda name, tensor: tensor)
    state = {}
    for file in checkpoint.weight_files(path):
        state.update(_read_file(file, fuse, place))
    if dtype is not None or device is not None:
        _return_freed_memory()
    return state


def _return_freed_memory() -> None:
    """glibc keeps the heap pages of freed buffers resident (here the bytes of tensors read in the
    file's dtype and cast): hand them back to the system (~100 MiB for a CLIP ViT-B/16 read into
    bf16). Elsewhere than glibc, nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
