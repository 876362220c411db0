"""Compile every Triton kernel a launcher can launch, for a GPU that is not here.

    python -m vlmfast.kernels.compile_all --arch sm_90a [--arch sm_80 ...] [--json FILE] [--jobs N]

For each arch, every module of vlmfast.kernels lists in `variants(target)` the compiles its
launchers can ask for: each (kernel, dtype, tile config) of its tables, with the heaviest
constexpr flags that lead to that config (see each module). Each is compiled by Triton for the
arch (no GPU, no driver: triton.compile on an ASTSource for a GPUTarget), in parallel processes;
its cubin's resource usage is read with cuobjdump (shipped with Triton).

Integer arguments are specialised as at a launch of a representative (contiguous) problem of
the variant's class (each module's `variants` gives them): Triton compiles `x == 1` in and marks
multiples of 16 divisible, which decides vectorised loads and so registers.

One JSON line per compile (stdout, or FILE with --json): kernel, config (dtype, case, default,
constexprs, num_warps, num_stages), arch, ok, error, registers, spills (bytes of spill stores +
loads a thread, from ptxas -v where the cubin has local memory), stack_bytes (local memory a
thread: spills or a local array; what Triton reports as n_spills on a GPU), shared_bytes (the
dynamic shared memory a block asks for), seconds. A summary goes to stderr.

Exit status 1 when any compile fails, when a kernel's shared memory passes the arch's limit per
block, or when a default config (what the launcher picks without VLMFAST_TUNE) spills.
TRITON_INTERPRET must be unset (the interpreter compiles nothing).
"""

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Dynamic shared memory a block may ask for (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def parse_arch(arch: str) -> int:
    """sm_90a / sm_90 / 90 -> 90."""
    match = re.fullmatch(r"(?:sm_)?(\d+)a?", arch.strip())
    if not match or int(match.group(1)) not in SHARED_LIMITS:
        raise argparse.ArgumentTypeError(
            f"--arch: expected one of {', '.join(f'sm_{c}' for c in SHARED_LIMITS)} (sm_90a for Hopper), got {arch!r}"
        )
    return int(match.group(1))


def table_target(capability: int) -> str:
    """The launchers' tile table for a compute capability (kernels/_common.target_of's answer)."""
    return "sm_90" if capability >= 90 else "sm_80"


def kernel_modules() -> list[str]:
    """Every module of vlmfast.kernels that defines `variants` (the launchers)."""
    import vlmfast.kernels as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "compile_all":
            continue
        module = importlib.import_module(f"vlmfast.kernels.{info.name}")
        if hasattr(module, "variants"):
            names.append(info.name)
    return names


def all_variants(capability: int) -> list[tuple[str, int, object]]:
    """(module, index, Variant) for every compile of `capability`, indices stable per module."""
    out = []
    for name in kernel_modules():
        module = importlib.import_module(f"vlmfast.kernels.{name}")
        for i, variant in enumerate(module.variants(table_target(capability))):
            out.append((name, i, variant))
    return out


def _cuobjdump() -> str | None:
    import triton

    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older triton: no knobs
        pass
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "stack_bytes"} of the (single) kernel in a cubin, from cuobjdump -res-usage:
    REG registers a thread; STACK + LOCAL bytes of local memory a thread (spilled registers, or
    a local array such as the one of sin/cos's slow path for huge arguments)."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not match:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {text[:300]!r}")
    reg, stack, _, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack + local}


def _ptxas_candidates() -> list[str]:
    """Triton's ptxas binaries (3.9 ships a second, newer one as ptxas-blackwell), then PATH's."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [str(folder / name) for name in ("ptxas-blackwell", "ptxas") if (folder / name).exists()]
    return found + ([shutil.which("ptxas")] if shutil.which("ptxas") else [])


def spill_bytes(ptx: str, capability: int) -> int:
    """Bytes of spill stores + loads a thread, from ptxas -v on the kernel's PTX (run only when the
    cubin has local memory: it tells spills from a local array)."""
    arch = f"sm_{capability}{'a' if capability == 90 else ''}"
    done = None
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        # The ptxas that reads this PTX version, with Triton's own flag where that ptxas knows it.
        attempts = [(tool, extra) for tool in _ptxas_candidates() for extra in (["--regAllocOptLevel=2"], [])]
        for tool, extra in attempts:
            done = subprocess.run([tool, "-v", *extra, f"--gpu-name={arch}", str(source), "-o", str(source) + ".o"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"ptxas -v failed: {done.stderr[-500:] if done else 'no ptxas found'}")
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return int(match.group(1)) + int(match.group(2)) if match else 0


def _specialize(value: int) -> str:
    """Triton's launch-time specialisation of an integer argument: "1" (compiled in as a
    constant), "D" (divisible by 16) or "" (nothing known)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        return "1" if kind == "constexpr" else spec
    except (ImportError, TypeError):  # older triton: the same rule, by hand
        return "1" if value == 1 else "D" if value % 16 == 0 else ""


def specialization(variant) -> tuple[dict, dict, dict]:
    """(signature, constexprs by index, attrs) to compile `variant` as a launch with its
    representative integer arguments would be: pointers 16-byte aligned (torch allocations),
    integers equal to 1 compiled in, multiples of 16 marked divisible."""
    from triton.backends.compiler import BaseBackend

    signature = dict(variant.signature())
    names = [name for name, _ in _kernel_params(variant)]
    constexprs = {(names.index(k),): v for k, v in variant.constexprs.items()}
    attrs = {}
    for index, name in enumerate(names):
        kind = signature[name]
        if kind.startswith("*"):
            attrs[(index,)] = BaseBackend.parse_attr("D")
        elif kind in ("i32", "i64") and name in variant.ints:
            spec = _specialize(int(variant.ints[name]))
            if spec == "1":
                signature[name] = "constexpr"
                constexprs[(index,)] = 1
            elif spec:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _kernel_params(variant):
    from vlmfast.kernels._common import kernel_params

    return kernel_params(variant.kernel)


def compile_one(module: str, index: int, capability: int) -> dict:
    """Compile variant `index` of `module` for `capability`; the JSON record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"vlmfast.kernels.{module}")
    variant = mod.variants(table_target(capability))[index]
    record = {"kernel": f"{module}.{variant.name}", "config": variant.describe(),
              "arch": f"sm_{capability}{'a' if capability == 90 else ''}", "ok": False, "error": None,
              "registers": None, "spills": None, "stack_bytes": None, "shared_bytes": None, "seconds": None}
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = specialization(variant)
        source = ASTSource(variant.kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(variant.options))
        record.update(resource_usage(compiled.asm["cubin"]))
        record["spills"] = spill_bytes(compiled.asm["ptx"], capability) if record["stack_bytes"] else 0
        record["shared_bytes"] = int(compiled.metadata.shared)
        record["ok"] = True
    except Exception as error:  # noqa: BLE001 - every failure is a record, not a crash
        record["error"] = f"{type(error).__name__}: {error}"[-2000:]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def problems(record: dict) -> list[str]:
    """Why a record fails the check (empty: it passes)."""
    if not record["ok"]:
        return [f"compile error: {record['error']}"]
    out = []
    capability = parse_arch(record["arch"])
    if record["shared_bytes"] > SHARED_LIMITS[capability]:
        out.append(f"shared memory {record['shared_bytes']} B > {SHARED_LIMITS[capability]} B")
    if record["spills"] and record["config"]["default"]:
        out.append(f"a default config spills {record['spills']} B a thread")
    return out


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _cost(variant) -> int:
    # Compile time grows with the tiles: start the big ones first so the pool ends together.
    c = variant.constexprs
    return c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("BLOCK_E", c.get("BLOCK_K", 1))


def run(capabilities: list[int], jobs: int, out, only: str | None = None) -> int:
    """Compile everything (or the kernels whose module.name contains `only`), write the records
    to `out`, print a summary; the exit status."""
    tasks = []
    for capability in capabilities:
        tasks += [(module, index, capability, _cost(variant)) for module, index, variant in all_variants(capability)
                  if only is None or only in f"{module}.{variant.name}"]
    tasks.sort(key=lambda t: -t[3])
    start = time.perf_counter()
    records = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                initializer=_init_worker) as pool:
        futures = [pool.submit(compile_one, module, index, capability) for module, index, capability, _ in tasks]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
    failures = [(r, p) for r in records for p in [problems(r)] if p]
    _summary(records, failures, time.perf_counter() - start, jobs)
    return 1 if failures else 0


def _summary(records, failures, seconds, jobs) -> None:
    err = sys.stderr
    by_kernel: dict = {}
    for r in records:
        by_kernel.setdefault((r["arch"], r["kernel"]), []).append(r)
    # spills: default configs that spill (count x max bytes); candidates for tuning may spill
    print(f"{'arch':7} {'kernel':44} {'compiles':>8} {'max regs':>8} {'spills(B)':>9} {'max smem':>9}", file=err)
    for (arch, kernel), rs in sorted(by_kernel.items()):
        ok = [r for r in rs if r["ok"]]
        regs = max((r["registers"] for r in ok), default=0)
        spilling = [r["spills"] for r in ok if r["spills"] and r["config"]["default"]]
        spills, max_spill = len(spilling), max(spilling, default=0)
        smem = max((r["shared_bytes"] for r in ok), default=0)
        spill_text = f"{spills}x<={max_spill}" if spills else "0"
        print(f"{arch:7} {kernel:44} {len(rs):>8} {regs:>8} {spill_text:>9} {smem:>9}", file=err)
    print(f"{len(records)} compiles in {seconds:.0f} s on {jobs} processes; {len(failures)} failing", file=err)
    for record, reasons in failures:
        print(f"FAIL {record['arch']} {record['kernel']} {record['config']}: {'; '.join(reasons)}", file=err)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmfast.kernels.compile_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", type=parse_arch, required=True,
                        help="target GPU architecture, e.g. sm_90a (H100/H200) or sm_80 (A100); repeatable")
    parser.add_argument("--json", metavar="FILE", help="write the JSON lines here instead of stdout")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: every CPU)")
    parser.add_argument("--kernel", metavar="TEXT", help="only the kernels whose module.name contains TEXT")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it (the interpreter compiles nothing for a GPU)")
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive count, got {args.jobs}")
    capabilities = list(dict.fromkeys(args.arch))
    if args.json:
        with open(args.json, "w") as out:
            return run(capabilities, args.jobs, out, args.kernel)
    return run(capabilities, args.jobs, sys.stdout, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
