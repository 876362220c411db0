"""Reads ptxas's resource report (nvcc -Xptxas=-v; setup.py keeps it as <source>.ptxas.log next
to each CUDA object) and fails on register spills, like vlmfast.kernels.compile_all for Triton.

    python .ci/ptxas_report.py BUILD_TEMP/cuda/*.ptxas.log [--json FILE]

Prints one row per (kernel, arch): registers, spill bytes (stores + loads), stack frame, static
shared memory; exit status 1 when any kernel spills or no kernel was reported at all.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<regs>\d+) registers(?P<rest>.*)")
SMEM = re.compile(r"(\d+) bytes smem")


def parse(text: str, source: str = "") -> list[dict]:
    """One record per compiled entry function of a ptxas -v log."""
    records, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"source": source, "kernel": m["name"], "arch": m["arch"], "registers": None,
                       "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 0}
            records.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["stack_bytes"] = int(m["stack"])
            current["spill_bytes"] = int(m["stores"]) + int(m["loads"])
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m["regs"])
            smem = SMEM.search(m["rest"])
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return records


def demangle(names: list[str]) -> dict:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    # vlmfast::cuda::(anonymous namespace)::rotary_kernel<__half>(...) -> rotary_kernel<__half>
    name = name.replace("(anonymous namespace)", "anon")
    name = re.sub(r"\(.*\)$", "", name).removeprefix("void ")
    return name.split("::")[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--json", metavar="FILE", help="also write one JSON line per kernel here")
    args = parser.parse_args(argv)
    records = []
    for log in args.logs:
        records += parse(log.read_text(), log.name.removesuffix(".ptxas.log"))
    names = demangle([r["kernel"] for r in records])
    for r in records:
        r["kernel"] = _short(names[r["kernel"]])
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{'source':14} {'kernel':44} {'arch':8} {'regs':>5} {'spills':>7} {'stack':>6} {'smem':>6}")
    for r in sorted(records, key=lambda r: (r["source"], r["kernel"], r["arch"])):
        print(f"{r['source']:14} {r['kernel'][:44]:44} {r['arch']:8} {r['registers']:>5} {r['spill_bytes']:>7} "
              f"{r['stack_bytes']:>6} {r['shared_bytes']:>6}")
    spilling = [r for r in records if r["spill_bytes"]]
    print(f"{len(records)} kernels; max {max((r['registers'] or 0 for r in records), default=0)} registers; "
          f"{len(spilling)} spilling")
    if not records:
        print("ptxas_report: no kernel in the logs (was nvcc run with -Xptxas=-v?)", file=sys.stderr)
        return 1
    for r in spilling:
        print(f"FAIL {r['source']} {r['kernel']} {r['arch']}: spills {r['spill_bytes']} bytes", file=sys.stderr)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
