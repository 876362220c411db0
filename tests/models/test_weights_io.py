"""vlmfast/models/weights_io.py: a checkpoint read without a memory map, groups fused in place."""

import json

import pytest
import torch
from safetensors.torch import save_file

from vlmfast.models import checkpoint
from vlmfast.models import weights_io
from vlmfast.models.smolvlm.model import fuse_gate_up


def write(folder, tensors_per_shard):
    if len(tensors_per_shard) == 1:
        save_file(tensors_per_shard[0], str(folder / "model.safetensors"))
        return
    weight_map = {}
    for i, tensors in enumerate(tensors_per_shard):
        name = f"model-{i + 1:05d}-of-{len(tensors_per_shard):05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def sample(g):
    t = lambda *shape, dtype=torch.bfloat16: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return {
        "a.layers.0.self_attn.q_proj.weight": t(6, 5), "a.layers.0.self_attn.k_proj.weight": t(2, 5),
        "a.layers.0.self_attn.v_proj.weight": t(2, 5), "a.layers.0.self_attn.q_proj.bias": t(6),
        "a.layers.0.self_attn.k_proj.bias": t(2), "a.layers.0.self_attn.v_proj.bias": t(2),
        "a.layers.0.mlp.gate_proj.weight": t(7, 5), "a.layers.0.mlp.up_proj.weight": t(7, 5),
        "a.layers.1.mlp.gate_proj.weight": t(3, 5),  # no up_proj: stays unfused
        "a.layers.1.self_attn.q_proj.weight": t(4, 5, dtype=torch.float32),  # dtypes differ: unfused
        "a.layers.1.self_attn.k_proj.weight": t(4, 5), "a.layers.1.self_attn.v_proj.weight": t(4, 5),
        "a.norm.weight": t(5, dtype=torch.float32), "a.ids": torch.arange(3), "a.flag": torch.tensor([True, False]),
        "a.empty": torch.empty(0, 5),
    }


@pytest.mark.parametrize("shards", [1, 2])
def test_read_equals_safetensors_and_fused_equals_loading(tmp_path, shards):
    tensors = sample(torch.Generator().manual_seed(0))
    keys = sorted(tensors)
    write(tmp_path, [{k: tensors[k] for k in keys[i::shards]} for i in range(shards)])
    expected = checkpoint.read_weights(tmp_path)
    plain = weights_io.read_weights(tmp_path)
    assert plain.keys() == expected.keys()
    for k in expected:
        assert plain[k].dtype == expected[k].dtype and torch.equal(plain[k], expected[k]), k
    fused = weights_io.read_weights(tmp_path, fuse=True)
    loading = fuse_gate_up(checkpoint.hf_to_native(expected))  # what loading makes of the checkpoint
    if shards == 1:  # a group split between shards is fused later, by loading (a copy)
        assert "a.layers.0.self_attn.qkv.weight" in fused and "a.layers.0.mlp.gate_up.weight" in fused
    assert "a.layers.1.mlp.gate_proj.weight" in fused and "a.layers.1.self_attn.q_proj.weight" in fused
    assert fuse_gate_up(checkpoint.hf_to_native(fused)).keys() == loading.keys()
    for k, v in fuse_gate_up(checkpoint.hf_to_native(fused)).items():
        assert v.dtype == loading[k].dtype and torch.equal(v, loading[k]), k


def test_truncated_file(tmp_path):
    write(tmp_path, [{"w": torch.randn(64, 64)}])
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        weights_io.read_weights(tmp_path)


def test_cast_as_read_equals_casting_after(tmp_path):
    tensors = sample(torch.Generator().manual_seed(1))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # a float32 checkpoint
    write(tmp_path, [tensors])
    after = weights_io.read_weights(tmp_path, fuse=True)
    cast = weights_io.read_weights(tmp_path, fuse=True, dtype=torch.bfloat16, float32_prefixes=("a.norm",))
    assert cast.keys() == after.keys()
    for k, v in after.items():
        expected = v if not v.is_floating_point() or k.startswith("a.norm") else v.to(torch.bfloat16)
        assert cast[k].dtype == expected.dtype and torch.equal(cast[k], expected), k
    assert cast["a.layers.0.self_attn.qkv.weight"].dtype == torch.bfloat16  # a fused group, cast whole
    assert cast["a.ids"].dtype == torch.int64 and cast["a.flag"].dtype == torch.bool
    # dtype None with a device given: float32, as every vlmfast model is built
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    write(bf16, [{"w": torch.randn(3, 4).bfloat16()}])
    assert weights_io.read_weights(bf16, device="cpu")["w"].dtype == torch.float32
    assert weights_io.read_weights(bf16)["w"].dtype == torch.bfloat16  # nothing given: the file's own


PEAK_SCRIPT = r"""
import sys, torch
from vlmfast.models import weights_io
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
before = hwm()
state = weights_io.read_weights(sys.argv[1], dtype=torch.bfloat16)
print(hwm() - before, sum(t.numel() * t.element_size() for t in state.values()) / 2**20)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cast_as_read_never_holds_the_float32_checkpoint(tmp_path):
    """A float32 checkpoint read as bf16: the peak is the bf16 weights plus about one float32
    tensor, not the float32 checkpoint (+ its bf16 copy) as casting after reading had it."""
    import subprocess
    import sys

    # 6 tensors of 48 MiB: above glibc's largest mmap threshold, so each freed float32 buffer
    # goes back to the system at once and the resident set shows what is held
    tensors = {f"w{i}": torch.full((3 * 2**20, 4), float(i)) for i in range(6)}
    write(tmp_path, [tensors])
    del tensors
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mib, held_mib = map(float, done.stdout.split())
    float32_mib = 2 * held_mib  # the checkpoint's size
    assert held_mib == pytest.approx(144)
    # held (144) + one float32 tensor (48) + slack; the checkpoint alone would be 288
    assert peak_mib < held_mib + 48 + 40 < float32_mib, (peak_mib, held_mib)
