"""vlmfast.kernels.compile_all: every Triton kernel a launcher can launch compiles for sm_90a and
sm_80 (no GPU: triton.compile for a GPUTarget), fits the arch's shared memory and does not spill
registers in a default config; and nothing a launcher launches escapes its enumeration."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmfast.kernels import attention, compile_all, contrastive, linear_cross_entropy, patch_embed, rotary

KERNELS_DIR = Path(attention.__file__).parent
TARGETS = ("sm_90", "sm_80")


def _jit_functions(tree: ast.Module) -> set[str]:
    def is_jit(decorator):
        node = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(node, ast.Attribute) and node.attr == "jit" or isinstance(node, ast.Name) and node.id == "jit"

    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and any(is_jit(d) for d in f.decorator_list)}


def _launches(tree: ast.Module) -> tuple[set[str], list[str]]:
    """(kernels launched through _common.launch, direct `kernel[grid](...)` launches)."""
    through, direct = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "launch" and node.args and isinstance(node.args[0], ast.Name):
            through.add(node.args[0].id)
        if isinstance(func, ast.Subscript) and isinstance(func.value, ast.Name):
            direct.append(func.value.id)
    return through, direct


def _sources():
    return sorted(p for p in KERNELS_DIR.glob("*.py") if p.name != "compile_all.py")


def test_every_launched_kernel_is_enumerated_and_launched_through_the_guard():
    """Each @triton.jit kernel that a launcher launches goes through _common.launch (device guard,
    grid limits) and is in compile_all's enumeration for every target; a kernel added to a
    launcher without its variants fails here."""
    enumerated = {target: {f"{m}.{v.name}" for m, _, v in compile_all.all_variants(cap)}
                  for target, cap in (("sm_90", 90), ("sm_80", 80))}
    launched = set()
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        through, direct = _launches(tree)
        kernels = _jit_functions(tree)
        assert not [d for d in direct if d in kernels], f"{path.name}: launches {direct} without _common.launch"
        assert through <= kernels, f"{path.name}: launches what is not one of its kernels: {through - kernels}"
        launched |= {f"{path.stem}.{name}" for name in through}
    assert len(launched) >= 15, sorted(launched)
    for target, names in enumerated.items():
        assert launched <= names, f"{target}: launched but not compiled: {sorted(launched - names)}"


def _variant_configs(module, target):
    """(kernel name, dtype) -> the tile configs (BLOCK_* and launch options) enumerated."""
    out = {}
    for v in module.variants(target):
        config = {k: x for k, x in v.constexprs.items() if k.startswith("BLOCK") and k != "BLOCK_E"}
        config.update(v.options)
        out.setdefault((v.name, v.dtype), []).append(config)
    return out


def _assert_in(configs, kernel, dtype, config, context):
    config = {k: v for k, v in config.items() if k.startswith(("BLOCK", "num_")) and k != "BLOCK_E"}
    assert config in configs.get((kernel, dtype), []), f"{kernel} {dtype} {context}: {config} is not compiled"


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_a_launcher_can_choose_is_enumerated(target):
    """The launchers' tables, over their whole domain (head dims 1..256, lengths, flags, feature
    dims, vocabularies, rotary widths), only choose configs that compile_all compiles."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    configs = _variant_configs(attention, target)
    for dtype in dtypes:
        for head_dim in range(1, 257):
            block_e = attention._block_e(head_dim)
            for rot in (False, True):
                for bias in (False, True):
                    for short in (False, True):
                        for c in attention.forward_tiles(target, dtype, block_e, short, rot, bias):
                            _assert_in(configs, "_fwd_kernel", dtype, c, (head_dim, rot, bias, short))
                kv, dq = attention.backward_tiles(target, dtype, block_e, bias)
                for c in kv:
                    _assert_in(configs, "_dkdv_kernel", dtype, c, (head_dim, bias))
                for c in dq:
                    _assert_in(configs, "_dq_kernel", dtype, c, (head_dim, bias))
            for rows in range(1, attention.DECODE_ROWS + 1):
                _assert_in(configs, "_decode_split_kernel", dtype, attention.decode_tiles(target, dtype, block_e, rows), rows)
    configs = _variant_configs(contrastive, target)
    for dtype in dtypes:
        for d in (1, 17, 64, 100, 128, 200, 256, 512, 768, 1152, 4096):
            for c in contrastive.forward_tiles(target, dtype, d):
                _assert_in(configs, "_row_lse_kernel", dtype, c, d)
                _assert_in(configs, "_siglip_rows_kernel", dtype, c, d)
            for c in contrastive.grad_tiles(target, dtype, d):
                _assert_in(configs, "_row_grad_kernel", dtype, c, d)
    configs = _variant_configs(linear_cross_entropy, target)
    for dtype in dtypes:
        for c in linear_cross_entropy.tile_candidates(target, dtype):
            _assert_in(configs, "_lse_partial_kernel", dtype, c, "")
            _assert_in(configs, "_grad_logits_kernel", dtype, c, "")
    configs = _variant_configs(patch_embed, target)
    for dtype in dtypes:
        for c in patch_embed.gemm_tiles(target, dtype):
            _assert_in(configs, "_patch_embed_kernel", dtype, c, "")
        _assert_in(configs, "_patch_gather_kernel", dtype, patch_embed.GATHER_TILE, "")
    configs = _variant_configs(rotary, target)
    for dtype in dtypes:
        for half in range(1, 300):
            block = rotary.block_half(half)
            _assert_in(configs, "_rotary_kernel", dtype, dict(BLOCK_ROWS=rotary.rows_per_program(block), BLOCK_HALF=block), half)
            _assert_in(configs, "_table_backward_kernel", dtype, dict(BLOCK_ROWS=rotary.table_rows(block), BLOCK_HALF=block), half)
    for quarter in range(1, 300):
        _assert_in(configs, "_rope_2d_kernel", torch.float32, dict(BLOCK_N=rotary.ROPE_ROWS, BLOCK_Q=rotary.block_half(quarter)), quarter)


def _record(**overrides):
    record = {"kernel": "m.k", "config": {"dtype": "bfloat16", "default": True}, "arch": "sm_90a", "ok": True,
              "error": None, "registers": 128, "spills": 0, "shared_bytes": 1024}
    record.update(overrides)
    return record


def test_the_check_fails_what_it_must():
    assert compile_all.problems(_record()) == []
    assert compile_all.problems(_record(ok=False, error="CompilationError: x")) == ["compile error: CompilationError: x"]
    assert compile_all.problems(_record(shared_bytes=232449))[0].startswith("shared memory 232449 B > 232448 B")
    assert compile_all.problems(_record(arch="sm_80", shared_bytes=166913))[0].startswith("shared memory 166913 B > 166912")
    assert compile_all.problems(_record(spills=24))[0].startswith("a default config spills 24 B")
    assert compile_all.problems(_record(spills=24, config={"dtype": "bfloat16", "default": False})) == []
    assert compile_all.parse_arch("sm_90a") == 90 and compile_all.parse_arch("sm_80") == 80
    with pytest.raises(Exception, match="--arch: expected one of"):
        compile_all.parse_arch("sm_75")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    return env


def test_refuses_to_run_under_the_interpreter():
    done = subprocess.run([sys.executable, "-m", "vlmfast.kernels.compile_all", "--arch", "sm_90a"],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET=1 is set" in done.stderr


def test_every_kernel_compiles_for_sm90a_and_sm80(tmp_path):
    """The real thing (CI runs it; minutes on two cores): every enumerated compile for sm_90a and
    sm_80 succeeds, within shared memory, no spill in a default config; one record each."""
    out = tmp_path / "compile.jsonl"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "vlmfast.kernels.compile_all", "--arch", "sm_90a", "--arch", "sm_80", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=3600,
    )
    seconds = time.perf_counter() - start
    summary = done.stderr[-6000:]
    assert done.returncode == 0, summary
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = len(compile_all.all_variants(90)) + len(compile_all.all_variants(80))
    assert len(records) == expected, summary
    assert all(r["ok"] and r["registers"] and r["shared_bytes"] is not None for r in records), summary
    assert {r["arch"] for r in records} == {"sm_90a", "sm_80"}
    print(f"compile_all: {len(records)} compiles in {seconds:.0f} s\n{summary}")
